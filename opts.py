"""Every training option, under the original SGRAF/DAA names and defaults, plus what users need.

Two switches of the original are store_false flags that turn a feature OFF when given:
`--max_violation` (hardest-negative hinge; on by default) and `--bi_gru` (bidirectional GRU; on by
default). They are kept so the original command lines run verbatim; `--no_max_violation` and
`--no_bi_gru` say the same thing in words that match what they do.
"""
import argparse

from errors import ArgumentParser


def build_parser():
    parser = ArgumentParser(description="Train SGR, SAF or VSE with the VSE++ triplet loss + DAA, or PCME (PCME++) "
                                        "with its soft contrastive (closed-form matching) loss + DAA.")
    # data and output paths
    parser.add_argument("--data_path", default="data", help="folder holding {data_name}/ (SCAN precomp layout)")
    parser.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp, or any folder name")
    parser.add_argument("--vocab_path", default="vocab/", help="folder holding {data_name}_vocab.json")
    parser.add_argument("--model_name", default="SGRAF", help="folder for checkpoint_{epoch}.pth.tar and model_best.pth.tar")
    parser.add_argument("--logger_name", default="./log", help="folder for the TensorBoard logs")
    # training
    parser.add_argument("--batch_size", default=128, type=int, help="training batch size per process")
    parser.add_argument("--num_epochs", default=30, type=int,
                        help="epochs of the whole run (a resumed run trains on up to this total)")
    parser.add_argument("--lr_update", default=20, type=int, help="divide the learning rate by 10 every this many epochs")
    parser.add_argument("--learning_rate", default=0.00015, type=float,
                        help="base learning rate; multiplied by world_size x accum_steps at run time")
    parser.add_argument("--workers", default=0, type=int, help="data loader worker processes")
    parser.add_argument("--log_step", default=10, type=int, help="iterations between log lines and TensorBoard points")
    parser.add_argument("--val_step", default=10000, type=int, help="iterations between mid-epoch validations")
    parser.add_argument("--grad_clip", default=2.0, type=float, help="clip the gradient norm (0 = off)")
    parser.add_argument("--margin", default=0.2, type=float,
                        help="SGR, SAF, VSE only: hinge margin of the triplet loss")
    parser.add_argument("--max_violation", action="store_false",
                        help="(original switch) GIVING it turns hardest-negative mining OFF (sum of violations); "
                             "SGR, SAF, VSE only")
    parser.add_argument("--no_max_violation", dest="max_violation", action="store_false",
                        help="SGR, SAF, VSE only: sum the violations instead of taking the hardest negative")
    parser.add_argument("--local_rank", default=0, type=int, help="set by old launchers; torchrun uses LOCAL_RANK")
    parser.add_argument("--world_size", default=1, type=int,
                        help="number of processes (GPUs) to train on; SAF's gate BatchNorm pools each caption's "
                             "statistics over the processes, as the original's SyncBatchNorm")
    # model
    parser.add_argument("--img_dim", default=2048, type=int, help="region feature dimension")
    parser.add_argument("--word_dim", default=300, type=int, help="word embedding dimension")
    parser.add_argument("--embed_size", default=1024, type=int, help="joint embedding dimension")
    parser.add_argument("--sim_dim", default=256, type=int, help="similarity vector dimension")
    parser.add_argument("--num_layers", default=1, type=int, help="GRU layers")
    parser.add_argument("--bi_gru", action="store_false",
                        help="(original switch) GIVING it turns the bidirectional GRU OFF")
    parser.add_argument("--no_bi_gru", dest="bi_gru", action="store_false", help="use a unidirectional GRU")
    parser.add_argument("--no_imgnorm", action="store_true", help="do not l2-normalise region embeddings")
    parser.add_argument("--no_txtnorm", action="store_true", help="do not l2-normalise word embeddings")
    parser.add_argument("--module_name", default="SGR", choices=["SGR", "SAF", "VSE", "PCME", "PCMEpp"],
                        help="SGR, SAF: similarity reasoning on every (image, caption) pair; VSE, PCME, PCMEpp "
                             "(PCME++): embedding models, one vector (PCME, PCMEpp: one Gaussian) per image and "
                             "caption")
    parser.add_argument("--sgr_step", default=3, type=int, help="graph reasoning steps of SGR")
    parser.add_argument("--vse_pool", default="mean", choices=["mean", "max", "gpo"],
                        help="VSE only: how regions and words are pooled into one vector (gpo: VSE∞'s generalized "
                             "pooling operator)")
    parser.add_argument("--pcme_samples", default=7, type=int,
                        help="PCME only: samples per image and caption in training (scores average K x K pairs)")
    parser.add_argument("--pcme_vib_weight", default=1e-5, type=float,
                        help="PCME only: weight of the KL (VIB) regulariser of the Gaussians to N(0, I)")
    parser.add_argument("--pcmepp_vib_weight", default=1e-4, type=float,
                        help="PCMEpp only: weight of the KL (VIB) regulariser, the mean over items and dims")
    parser.add_argument("--pcmepp_pseudo_weight", default=0.1, type=float,
                        help="PCMEpp only: weight of the matching loss with pseudo-positives (pairs whose logit is at "
                             "least the positive's)")
    parser.add_argument("--pcmepp_init_scale", default=5.0, type=float,
                        help="PCMEpp only: initial a of the training logits -a CSD + b (learned; PCME++'s config: 5)")
    parser.add_argument("--pcmepp_center_means", action="store_true",
                        help="PCMEpp only, not in PCME++: subtract each modality's centre (the batch's mean in "
                             "training, a running mean in evaluation) from the pooled means before their l2 "
                             "normalisation")
    parser.add_argument("--pcmepp_init_shift", default=5.0, type=float,
                        help="PCMEpp only: initial b of the training logits -a CSD + b (learned; PCME++'s config: 5). "
                             "-a CSD + b > 0 where the means' cosine exceeds 1 - b / (2a) (sigma^2 aside): 0.5 at 5, 5")
    # DAA
    parser.add_argument("--daa_weight", default=25.0, type=float, help="weight of each DAA term (0 = DAA off)")
    parser.add_argument("--daa_temp", default=0.001, type=float, help="sigmoid temperature tau of the soft ranks")
    parser.add_argument("--daa_variant", default="reference", choices=["reference", "paper", "tie_aware"],
                        help="reference: the released code's indexing, which trained the published models; "
                             "paper: the formula as printed (ranks within each query row); tie_aware: paper's "
                             "ranks with a tied score counted as ranked above, as the ASP metric counts it")
    parser.add_argument("--warmup_epochs", default=0, type=int,
                        help="SGR, SAF, VSE only: epochs that sum the hinge violations before hardest-negative mining "
                             "starts")
    # running
    parser.add_argument("--seed", default=0, type=int, help="seed of the weights, dropout and data order")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu (decided on every start, resumes included)")
    parser.add_argument("--threads", default=0, type=int,
                        help="CPU threads per process (0: torch's default, one per core; K CPU processes get "
                             "cores/K each). On a machine shared with other jobs give 1: two threads on two busy "
                             "cores can run several times slower than one")
    parser.add_argument("--resume", default="",
                        help="continue a run: a checkpoint, a run folder or 'latest' (newest checkpoint_{epoch} "
                             "of --model_name). Every option comes back from the checkpoint; options given here "
                             "override it and are logged; dims, module and vocabulary cannot change")
    parser.add_argument("--init_from", default="", help="start from this checkpoint's weights only (fine-tuning)")
    parser.add_argument("--accum_steps", default=1, type=int,
                        help="accumulate this many batches per optimizer step: a K-GPU recipe on one GPU, except "
                             "that BatchNorm statistics (SAF's gate, VisualSA) come from each batch alone, where "
                             "K GPUs pool them")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision")
    parser.add_argument("--val_images", default=0, type=int, help="validate on the first N dev images (0 = all)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                        help="numerics of validation's similarity matrix (scores and ranking stay fp32)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels (torch.use_deterministic_algorithms, a fixed cuBLAS "
                             "workspace): a resumed GPU run then repeats a straight one bit for bit, somewhat "
                             "slower; without it GPU runs differ in the last bits from run to run (atomic adds in "
                             "backward). CPU runs are deterministic either way")
    parser.add_argument("--dist_timeout", default=1800, type=int,
                        help="seconds a process waits for a lost peer before giving up (distributed runs)")
    return parser


def parse_opt(argv=None):
    """Parse the command line (argv=None: sys.argv) into an argparse.Namespace."""
    return build_parser().parse_args(argv)


# Options that only some modules read: given on a run of another module, they would silently do nothing.
# The VSE++ hinge's (margin, hardest negatives, their warm-up) are read by the modules it trains, not by
# PCME's and PCME++'s losses.
HINGE_MODULES = ("SGR", "SAF", "VSE")
MODULE_OPTIONS = {"vse_pool": ("VSE",), "pcme_samples": ("PCME",), "pcme_vib_weight": ("PCME",),
                  "pcmepp_vib_weight": ("PCMEpp",), "pcmepp_pseudo_weight": ("PCMEpp",),
                  "pcmepp_init_scale": ("PCMEpp",), "pcmepp_init_shift": ("PCMEpp",),
                  "pcmepp_center_means": ("PCMEpp",), "margin": HINGE_MODULES, "max_violation": HINGE_MODULES,
                  "warmup_epochs": HINGE_MODULES}


def with_article(module_name):
    """'an SGR', 'an SAF', 'a VSE', 'a PCME': the article of a module's name read letter by letter (S: "ess")."""
    return f"{'an' if module_name[0] in 'AEFHILMNORSX' else 'a'} {module_name}"


def option_flags(dest):
    """The command-line names of option `dest`, e.g. '--max_violation/--no_max_violation'."""
    return "/".join(flag for action in build_parser()._actions if action.dest == dest for flag in action.option_strings)


def given_options(argv=None):
    """{option: value} of the options given on the command line `argv` (None: sys.argv), defaults left out:
    argv parsed again with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def with_defaults(opt):
    """Fill options missing from an older checkpoint's `opt` (e.g. the original release's) with defaults.

    `daa_variant` falls under the same rule: a checkpoint without it comes from the original release,
    whose DAA is the `reference` indexing; this project has stored the field in every checkpoint it wrote.
    """
    defaults = vars(build_parser().parse_args([]))
    for key, value in defaults.items():
        if not hasattr(opt, key):
            setattr(opt, key, value)
    return opt
