"""train.py's training step against the original's, restated from the maths (baselines/train_step.py).

One step on the same weights and the same dataset items: the loss terms, every parameter's gradient, the
BatchNorm running statistics and the updated weights agree to 1e-5 relative, for SGR and SAF and both DAA
variants, in one process and in two gloo processes (DDP, SAF's gate statistics pooled over the processes
as the original's SyncBatchNorm pools them). Float64 with dropout off, so that a difference can only come
from the algorithm, not from rounding (in float32 DAA's steep sigmoids amplify rounding noise: measured
up to 1e-3 of a tensor's largest gradient, 2e-5 of the model's). The project's side takes its options
from opts.py and its batch from data.py's collate, fed the items in draw order, so the defaults (DAA
variant, caption order) are under test too; the restatement collates and chooses the variant itself.
"""
import copy

import pytest
import torch
import torch.distributed as dist

import data
import distributed
import opts
import train
from tools.baselines.train_step import original_step
from daa_loss import DAALoss
from model import SimilarityModel
from tests.conftest import SYNTH_FEAT_DIM
from vocab import deserialize_vocab

BATCH = 10
TINY = ["--word_dim", "16", "--embed_size", "32", "--sim_dim", "16", "--learning_rate", "0.0002"]
# (module, DAA variant the original trains with, options): the reference variant is the default
CONFIGS = [("SGR", "reference", []), ("SGR", "paper", ["--daa_variant", "paper"]),
           ("SAF", "reference", []), ("SAF", "paper", ["--daa_variant", "paper"])]
RTOL = 1e-5


def training_data(synth):
    """(f30k train PrecompDataset, its vocabulary) of the session's synthetic data."""
    vocab = deserialize_vocab(f"{synth.vocab_path}/f30k_precomp_vocab.json")
    return data.PrecompDataset(synth.data_path, "f30k_precomp", "train", vocab), vocab


def drawn_items(dataset, n_processes):
    """BATCH dataset items per process, in draw order (lengths unsorted, with ties)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n_processes * BATCH]
    return [[dataset[int(j)] for j in order[k * BATCH:(k + 1) * BATCH]] for k in range(n_processes)]


def fresh_model(module_name, extra, n_processes, vocab_size):
    """(options as train.py parses them, the seeded float64 model with dropout off, several chunks per batch)."""
    opt = opts.parse_opt(TINY + ["--module_name", module_name, "--img_dim", str(SYNTH_FEAT_DIM), "--world_size",
                                 str(n_processes)] + extra)
    opt.vocab_size = vocab_size
    torch.manual_seed(0)
    model = SimilarityModel(opt).double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    model.sim_enc.max_elements = BATCH * 32 * 40  # a few captions per chunk: the statistics cross chunks
    return opt, model


def project_step(opt, model, items, relevance):
    """train.py's step on one process's items: (loss terms, gradients before clipping, gradient norm)."""
    criterion = DAALoss(opt.margin, opt.max_violation, opt.daa_weight, opt.daa_temp, opt.daa_variant)  # as train.py
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.learning_rate)
    train.set_learning_rate(opt, optimizer, 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, captions, lengths, _, _, block = data.TrainCollate(relevance)(items)
    losses = train.compute_losses(model, criterion, images.double(), captions, lengths, block.double(),
                                  opt.max_violation)
    scaler.scale(losses["loss"] / opt.accum_steps).backward()
    grads = {name: p.grad.clone() for name, p in train.unwrap(model).named_parameters()}
    norm = train.optimizer_step(model, optimizer, scaler, opt.grad_clip)
    return {name: value.detach() for name, value in losses.items()}, grads, norm


def restated_step(model, opt, batches, relevance, variant):
    return original_step(model, batches, relevance.block, opt.learning_rate, opt.daa_weight, variant,
                         opt.margin, opt.grad_clip, opt.daa_temp)


def assert_same_gradients(project, restated):
    """Loss terms, gradient norm and every parameter's gradient agree to RTOL.

    A tensor's gradient is compared relative to its own largest element, except where that is below 1e-9
    of the model's largest: those gradients are mathematically 0 (a bias before a train-mode BatchNorm,
    shifts before a softmax), and their float64 rounding noise (~1e-17) is compared absolutely.
    """
    (losses, grads, norm), (r_losses, r_grads, r_norm) = project, restated
    for name, value in r_losses.items():
        torch.testing.assert_close(losses[name], value.detach(), rtol=RTOL, atol=0, msg=name)
    torch.testing.assert_close(norm, r_norm.detach(), rtol=RTOL, atol=0)
    assert grads.keys() == r_grads.keys()
    largest = max(float(g.abs().max()) for g in r_grads.values())
    for name, g in r_grads.items():
        scale = max(float(g.abs().max()), 1e-9 * largest)
        assert float((grads[name] - g).abs().max()) <= RTOL * scale, name


def assert_same_update(before, after, r_after, lr):
    """The weights move alike (each element by about lr in Adam's first step) and the buffers agree:
    BatchNorm running statistics to RTOL, the number of updates exactly."""
    for name, value in r_after.items():
        if name.endswith("num_batches_tracked"):
            assert int(after[name]) == int(value), name
        elif "running_" in name:
            torch.testing.assert_close(after[name], value, rtol=RTOL, atol=1e-12, msg=name)
        else:
            torch.testing.assert_close(after[name] - before[name], value - before[name], rtol=RTOL, atol=RTOL * lr,
                                       msg=name)


def state(model):
    return {name: value.detach().clone() for name, value in train.unwrap(model).state_dict().items()}


@pytest.mark.parametrize("module_name,variant,extra", CONFIGS)
def test_one_process_step_equals_the_original(synth, module_name, variant, extra):
    dataset, vocab = training_data(synth)
    (items,) = drawn_items(dataset, 1)
    opt, model = fresh_model(module_name, extra, 1, len(vocab))
    reference = copy.deepcopy(model)
    before = state(model)
    project = project_step(opt, model, items, dataset.relevance)
    (r_losses,), r_grads, r_norm = restated_step(reference, opt, [items], dataset.relevance, variant)
    assert_same_gradients(project, (r_losses, r_grads, r_norm))
    assert_same_update(before, state(model), state(reference), opt.learning_rate)


def ddp_worker(rank, init_method, synth, out_dir):
    """One of two gloo processes: train.py's distributed set-up and step for every configuration; results to files."""
    distributed.init_group(rank, 2, init_method, "cpu", timeout_s=120)  # a lost peer ends the test, not CI
    torch.set_num_threads(1)
    try:
        write_step_results(rank, synth, out_dir)
    finally:
        dist.destroy_process_group()


def write_step_results(rank, synth, out_dir):
    """Rank `rank` of an initialised group of two: its step of every configuration, to out_dir."""
    dataset, vocab = training_data(synth)
    items = drawn_items(dataset, 2)[rank]
    for module_name, variant, extra in CONFIGS:
        opt, model = fresh_model(module_name, extra, 2, len(vocab))
        model = train.distribute(model, torch.device("cpu"))
        losses, grads, norm = project_step(opt, model, items, dataset.relevance)
        torch.save({"losses": losses, "grads": grads, "norm": norm, "state": state(model)},
                   f"{out_dir}/{module_name}_{variant}_rank{rank}.pt")


def test_two_process_step_equals_the_original_with_pooled_statistics(synth, tmp_path):
    """Two gloo processes (DDP), each on its own batch, against the restatement fed both batches.

    DDP's gradient is the mean over the processes of each one's loss gradient; SAF's gate statistics of
    caption i are pooled over both batches (forward and backward); the learning rate is doubled.
    """
    torch.multiprocessing.spawn(ddp_worker, args=(f"tcp://127.0.0.1:{distributed.free_port()}", synth, str(tmp_path)),
                                nprocs=2)
    assert_two_process_results_equal_the_original(synth, tmp_path)


def assert_two_process_results_equal_the_original(synth, out_dir):
    """What ddp_worker's two processes wrote to `out_dir` against the restatement fed both batches."""
    dataset, vocab = training_data(synth)
    batches = drawn_items(dataset, 2)
    for module_name, variant, extra in CONFIGS:
        opt, model = fresh_model(module_name, extra, 2, len(vocab))
        before = state(model)
        r_losses, r_grads, r_norm = restated_step(model, opt, batches, dataset.relevance, variant)
        ranks = [torch.load(out_dir / f"{module_name}_{variant}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        for rank, result in enumerate(ranks):  # each rank's own loss terms; the same gradient on both
            assert_same_gradients((result["losses"], result["grads"], result["norm"]),
                                  (r_losses[rank], r_grads, r_norm))
        assert_same_update(before, ranks[0]["state"], state(model), 2 * opt.learning_rate)
        for name, value in ranks[0]["state"].items():  # the weights and SAF's running statistics: the same on both
            if "v_global_w" not in name:  # VisualSA's BatchNorms keep per-process statistics on CPUs
                assert torch.equal(value, ranks[1]["state"][name]), name
