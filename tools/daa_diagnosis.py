"""What drives SGR's collapse under DAA: scores, gradients and the surrogate against the metric, per epoch.

    python -m tools.daa_diagnosis [--out_dir diagnosis_output] [--seed 0] [--threads 1] [--figure F.png]

Trains, with the ablation's data and schedule (tools.ablation: run_demo.SIZES / TRAINING["full"], DAA 25,
--seed; at one thread each run is the ablation's run of that setting bit for bit), the runs of RUNS: SGR
with `reference` (which collapses), SAF with `reference` (which does not), SGR with `tie_aware`, and SGR with
DAA off as the control. Then, for the weights at the end of every epoch (checkpoint_{epoch}), on the same
N_BATCHES training batches (the first of the epoch-0 order, train mode as in training, dropout seeded):

- the spread of the batch's scores S (B, B): their std, and the share of the pairs in a row (an image's
  captions, i2t) that lie within tau of each other (where DAA's sigmoids see a tie);
- the norms of the gradients of the hinge loss and of the DAA terms, each alone, over all weights, and
  their cosine (DAA's weight 25 included, as train.py sums them; for the control, the DAA gradient that
  weight 25 would add);
- asp_soft of the run's variant and of tie_aware against the exact ASP of the batch (evaluation.asp, mean of
  the two directions), so the surrogate's agreement with the metric can be followed as the scores move.

Writes {out_dir}/diagnosis.json, the table {out_dir}/diagnosis.md and, with --figure, the plot. A run whose
last checkpoint exists is not trained again (the ablation's folder layout: {out_dir}/runs/{setting}_seed{S}).
"""
import os
import sys

import numpy as np
import torch

import errors
import evaluation
import fileio
import run_demo
from checkpoint import load_checkpoint
from daa_loss import DAALoss, asp_soft
from data import get_train_loader
from model import SimilarityModel
from tools import ablation
from vocab import deserialize_vocab

# (module, DAA weight, variant): the collapsing run, the healthy one, the fix, the control.
RUNS = [("SGR", 25, "reference"), ("SAF", 25, "reference"), ("SGR", 25, "tie_aware"), ("SGR", 0, "reference")]
N_BATCHES = 8


def train_runs(out_dir, seed, threads):
    """Train every run of RUNS not yet trained; returns {setting name: run folder}."""
    data_path = os.path.join(out_dir, "data")
    run = run_demo.Runner(in_process=True, threads=threads)
    if not os.path.isfile(os.path.join(data_path, run_demo.DATA_NAME, "testall.h5")):
        run_demo.make_data("full", out_dir, lambda title: f"data: {title}", run)
    folders = {}
    for module, weight, variant in RUNS:
        name = ablation.setting_name(module, weight, variant)
        training = dict(run_demo.TRAINING["full"], daa_weight=weight)
        spec = (name, module, weight, variant, seed, 0, ablation.DEFAULT_BINDING)
        folders[name] = ablation.train(run, out_dir, "full", spec, training, name)["model"]
    return folders


def fixed_batches(opt, vocab):
    """The first N_BATCHES training batches of the run's epoch-0 order: [(images, captions, lengths, M)]."""
    loader = get_train_loader(opt, vocab, distributed=False)
    loader.sampler.set_epoch(0)
    batches = []
    for images, captions, lengths, _, _, relevance in loader:
        batches.append((images, captions, lengths, relevance))
        if len(batches) == N_BATCHES:
            return batches
    return batches


def exact_asp(S, M):
    """The metric ASP in [0, 1] of a batch, mean of i2t (rows) and t2i (columns)."""
    S, M = S.detach().numpy(), M.numpy()
    return (evaluation.asp(S, M) + evaluation.asp(S.T, M.T)) / 200


def soft_asp(S, M, temp, variant):
    """DAA's surrogate of the batch, mean of the two directions (in [0, 1])."""
    with torch.no_grad():
        return float(asp_soft(S, M, temp, variant) + asp_soft(S.t(), M.t(), temp, variant)) / 2


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def measure_epoch(path, batches, vocab_size):
    """The per-epoch measures of one checkpoint, averaged over the fixed batches."""
    ckpt = load_checkpoint(path)
    opt = ckpt["opt"]
    model = SimilarityModel.from_checkpoint(ckpt, path, vocab_size).train()
    epoch = ckpt["epoch"] - 1
    criterion = DAALoss(opt.margin, opt.max_violation, opt.daa_weight or 25, opt.daa_temp, opt.daa_variant)
    max_violation = opt.max_violation and epoch >= opt.warmup_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k, (images, captions, lengths, M) in enumerate(batches):
        torch.manual_seed(1000 + k)  # the same dropout masks for every checkpoint
        S = model(images, captions, lengths)
        losses = criterion(S, M, max_violation=max_violation)
        hinge = flat_grad(losses["contrastive_loss"], params)
        daa = flat_grad(losses["daa_i2t_loss"] + losses["daa_t2i_loss"], params)
        scores = S.detach()
        gaps = (scores.unsqueeze(2) - scores.unsqueeze(1)).abs()  # (B, a, c) within each image's row
        off_diagonal = ~torch.eye(scores.shape[1], dtype=torch.bool)
        rows.append({"score_std": float(scores.std()),
                     "share_within_tau": float((gaps[:, off_diagonal] < opt.daa_temp).float().mean()),
                     "hinge_grad_norm": float(hinge.norm()), "daa_grad_norm": float(daa.norm()),
                     "grad_cosine": float(torch.nn.functional.cosine_similarity(hinge, daa, dim=0)),
                     "asp_soft_run_variant": soft_asp(scores, M, opt.daa_temp, opt.daa_variant),
                     "asp_soft_paper": soft_asp(scores, M, opt.daa_temp, "paper"),
                     "asp_soft_tie_aware": soft_asp(scores, M, opt.daa_temp, "tie_aware"),
                     "asp_exact": exact_asp(scores, M)})
    return dict({key: float(np.mean([r[key] for r in rows])) for key in rows[0]}, epoch=epoch)


def diagnose(folders, out_dir):
    """{setting: [per-epoch measures]} of every run's checkpoints."""
    vocab = deserialize_vocab(os.path.join(out_dir, "vocab", f"{run_demo.DATA_NAME}_vocab.json"))
    report = {}
    for name, folder in folders.items():
        opt = load_checkpoint(os.path.join(folder, "checkpoint_0.pth.tar"))["opt"]
        opt.data_path = os.path.join(out_dir, "data")  # the same bytes wherever the run was trained (ablation folders)
        batches = fixed_batches(opt, vocab)
        report[name] = [measure_epoch(os.path.join(folder, f"checkpoint_{e}.pth.tar"), batches, len(vocab))
                        for e in range(opt.num_epochs)]
        print(f"{name}: " + "; ".join(f"epoch {m['epoch']} std {m['score_std']:.4f} tied {m['share_within_tau']:.3f} "
                                      f"|g_hinge| {m['hinge_grad_norm']:.3f} |g_daa| {m['daa_grad_norm']:.3f}"
                                      for m in report[name]))
    return report


COLUMNS = [("score_std", "score std", ".4f"), ("share_within_tau", "pairs within τ", ".3f"),
           ("hinge_grad_norm", "‖∇ hinge‖", ".3f"), ("daa_grad_norm", "‖∇ DAA‖", ".3f"), ("grad_cosine", "cos", "+.2f"),
           ("asp_soft_run_variant", "asp_soft (run's variant)", ".3f"), ("asp_soft_tie_aware", "asp_soft tie_aware", ".3f"),
           ("asp_exact", "ASP (metric)", ".3f")]


def markdown(report):
    """One table per run: the per-epoch measures."""
    lines = []
    for name, epochs in report.items():
        lines += [f"{name}:", "", "| epoch | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        lines += [f"| {m['epoch']} | " + " | ".join(f"{m[key]:{fmt}}" for key, _, fmt in COLUMNS) + " |" for m in epochs]
        lines.append("")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score_std", "std of a batch's scores", "log"), ("share_within_tau", "share of row pairs within τ", "linear"),
              ("hinge_grad_norm", "|∇ hinge| (solid), |∇ DAA| (dashed)", "log"),
              ("asp_soft_run_variant", "asp_soft of the run's variant (solid), exact ASP (dashed)", "linear")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title, scale) in zip(axes, panels):
        for k, (name, epochs) in enumerate(report.items()):
            x = [m["epoch"] for m in epochs]
            colour = f"C{k}"
            ax.plot(x, [m[key] for m in epochs], color=colour, label=name)
            partner = {"hinge_grad_norm": "daa_grad_norm", "asp_soft_run_variant": "asp_exact"}.get(key)
            if partner:
                ax.plot(x, [m[partner] for m in epochs], color=colour, linestyle="--")
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch (weights at its end)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser():
    p = errors.ArgumentParser(description="Per-epoch scores, gradients and surrogate-vs-metric of the DAA runs "
                                          "whose comparison explains SGR's collapse.")
    p.add_argument("--out_dir", default="diagnosis_output", help="data, runs and diagnosis.json")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (the ablation's seeds are 0, 1, 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the ablation's runs bit for bit)")
    p.add_argument("--figure", default=None, help="write the plot here (PNG)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    fileio.check_output(args.out_dir, folder=True)
    report = diagnose(train_runs(args.out_dir, args.seed, args.threads), args.out_dir)
    fileio.write_json({"runs": report, "n_batches": N_BATCHES, "seed": args.seed,
                       "training": dict(run_demo.TRAINING["full"], daa_weight=25)},
                      os.path.join(args.out_dir, "diagnosis.json"))
    fileio.write_text(markdown(report), os.path.join(args.out_dir, "diagnosis.md"))
    if args.figure:
        plot(report, args.figure)


if __name__ == "__main__":
    sys.exit(errors.run(main))
