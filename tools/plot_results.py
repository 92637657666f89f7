"""Figures for the README: training curves from TensorBoard logs, and the DAA ablation as bars.

    python -m tools.plot_results --logs demo_output/logs/SGR demo_output/logs/SAF --out_dir assets
    python -m tools.plot_results --ablation assets/ablation.json --out_dir assets

--logs: one or more train.py --logger_name folders (the legend names each run by the part of its path
that differs from the others', e.g. coco_SGR and coco_SAF for runs/coco_SGR/log and runs/coco_SAF/log); writes
{out_dir}/training_curves.png with the hinge (contrastive) loss, the two DAA terms, and the dev rsum
and ASP that train.py logs after every epoch. --ablation: the JSON written by ablation.py; writes
{out_dir}/ablation_daa.png with R@1, ASP and PMRP against the DAA weight for each model and variant
(mean over seeds, error bars one standard deviation) and the content oracle's ASP. The logs are read with TensorBoard's own EventAccumulator, so any run
TensorBoard shows can be plotted.
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (CI, remote machines)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import errors  # noqa: E402
import fileio  # noqa: E402
from errors import InputError  # noqa: E402

# The scalars train.py writes (names of the original code): per logged iteration and per validation.
LOSS_TAGS = ("contrastive_loss", "daa_i2t_loss", "daa_t2i_loss")
VALIDATION_TAGS = ("r_sum", "ASP", "ASPi")


def read_scalars(log_dir):
    """{tag: (steps int64 (n,), values float64 (n,))} of every scalar in a TensorBoard log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(log_dir):
        raise InputError(f"{log_dir}: TensorBoard log folder not found")
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0 = keep every point, not a sample
    events.Reload()
    tags = events.Tags()["scalars"]
    missing = [t for t in LOSS_TAGS + VALIDATION_TAGS if t not in tags]
    if missing:
        raise InputError(f"{log_dir}: no train.py scalars {', '.join(missing)} in the TensorBoard log "
                         f"(found: {', '.join(tags) or 'none'})")
    return {tag: (np.array([e.step for e in events.Scalars(tag)], dtype=np.int64),
                  np.array([e.value for e in events.Scalars(tag)], dtype=np.float64)) for tag in tags}


def run_names(log_dirs):
    """Legend names: each path without the leading and trailing folders all of them share (for one run,
    its last two folders), so runs/coco_SGR/log and runs/coco_SAF/log become coco_SGR and coco_SAF."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in log_dirs]
    if len(parts) == 1:
        return ["/".join(parts[0][-2:])]
    shortest = min(len(p) for p in parts)
    head = next((i for i in range(shortest) if len({p[i] for p in parts}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({p[len(p) - 1 - i] for p in parts}) > 1), shortest - head)
    return ["/".join(p[head:len(p) - tail]) or log_dirs[k] for k, p in enumerate(parts)]


def smooth(values, points=25):
    """Moving average over about len/points values (edges use what is there): per-batch losses are noisy."""
    window = max(1, len(values) // points)
    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones(len(values)), kernel, "same")


def plot_training(runs, path):
    """2x2 panels: hinge loss (log scale), DAA terms, dev rsum, dev ASP; one colour per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (loss_ax, daa_ax), (rsum_ax, asp_ax) = axes
    for k, (name, scalars) in enumerate(runs):
        colour = f"C{k}"
        steps, values = scalars["contrastive_loss"]
        loss_ax.plot(steps, values, color=colour, alpha=0.2, lw=0.8)
        loss_ax.plot(steps, smooth(values), color=colour, label=name)
        for tag, style, direction in (("daa_i2t_loss", "-", "i2t"), ("daa_t2i_loss", "--", "t2i")):
            steps, values = scalars[tag]
            daa_ax.plot(steps, smooth(values), color=colour, ls=style, label=f"{name} {direction}")
        rsum_ax.plot(*scalars["r_sum"], color=colour, marker="o", ms=3, label=name)
        for tag, style, direction in (("ASP", "-", "i2t"), ("ASPi", "--", "t2i")):
            asp_ax.plot(*scalars[tag], color=colour, ls=style, marker="o", ms=3, label=f"{name} {direction}")
    # The hinge loss sums all violations in the warm-up epochs and keeps only the hardest after: log scale.
    loss_ax.set(yscale="log", title="hinge triplet loss (per batch)", ylabel="loss")
    daa_ax.set(title="DAA terms: weight x (1 - ASP_soft), smoothed", ylabel="loss")
    rsum_ax.set(title="dev rsum (R@1+5+10, both directions)", ylabel="rsum")
    asp_ax.set(title="dev ASP", ylabel="ASP (%)")
    for ax in axes.flat:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_ablation(report, path):
    """Three panels (R@1, ASP, PMRP): mean ± std over seeds against the DAA weight, per model and variant.

    One line per (model, variant, training data) and direction (i2t solid, t2i dashed); weight 0 (DAA off)
    starts every line of its model and data. The content oracle's ASP is drawn as a horizontal line: the
    headroom.
    """
    groups = report["groups"]
    weights = sorted({g["daa_weight"] for g in groups})
    x_of = {w: k for k, w in enumerate(weights)}  # even spacing: the weights span 0 to 25

    def data_of(group):  # (noise rate, binding); reports made before the noisy entries have neither
        return group.get("noise_rate") or 0, group.get("binding")

    lines = {}
    for g in groups:
        variants = [g["variant"]] if g["daa_weight"] else sorted(
            {h["variant"] for h in groups if (h["module"], data_of(h)) == (g["module"], data_of(g)) and h["daa_weight"]})
        for variant in variants:
            lines.setdefault((g["module"], variant, data_of(g)), []).append(g)
    legend_rows = -(-(2 * len(lines) + 2) // 4)  # two directions per line and the oracle's two, in 4 columns
    legend_height = 0.17 * legend_rows + 0.2  # inches
    fig, axes = plt.subplots(1, 3, figsize=(14, 4 + legend_height))
    colours = plt.get_cmap("tab20")  # 20 distinct colours: the grid has more (model, variant, data) lines than 10
    for ax, (metric, title) in zip(axes, (("r1", "R@1"), ("asp", "ASP"), ("pmrp", "PMRP"))):
        for k, ((module, variant, (noise, binding)), members) in enumerate(sorted(lines.items())):
            members = sorted(members, key=lambda g: g["daa_weight"])
            x = [x_of[g["daa_weight"]] for g in members]
            data = (f" noise {noise:g}" if noise else "") + (f" binding {binding:g}" if binding not in (None, 0.5) else "")
            for d, style in (("i2t", "-"), ("t2i", "--")):
                ax.errorbar(x, [g["mean"][d][metric] for g in members], yerr=[g["std"][d][metric] for g in members],
                            color=colours(k % 20), ls=style, marker="o", ms=4, capsize=3,
                            label=f"{module} {variant}{data} {d}")
        if metric == "asp":
            for d, style in (("i2t", "-"), ("t2i", "--")):
                ax.axhline(report["references"]["content oracle"][d]["asp"], color="grey", ls=style, lw=1,
                           label=f"content oracle {d}")
        ax.set(xticks=range(len(weights)), xticklabels=[f"{w:g}" for w in weights], xlabel="DAA weight",
               title=title)
        ax.grid(alpha=0.3)
    # one legend below the panels: inside one, its many entries would hide the curves
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    n_seeds = max(len(g["runs"]) for g in groups)
    fig.suptitle(f"DAA ablation: mean ± std over up to {n_seeds} seeds ({report['scope']})", fontsize=10)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    save(fig, path)


def save(fig, path):
    """Write the PNG atomically (a figure the README links to is never half-written)."""
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    print(f"wrote {path}")


def build_parser():
    p = errors.ArgumentParser(description="Training curves (TensorBoard logs) and the DAA ablation chart.")
    p.add_argument("--logs", nargs="+", default=[], help="train.py --logger_name folders -> training_curves.png")
    p.add_argument("--ablation", default=None, help="ablation.py's JSON -> ablation_daa.png")
    p.add_argument("--out_dir", default="assets", help="folder for the PNG files")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.logs and not args.ablation:
        raise InputError("nothing to plot: give --logs and/or --ablation")
    fileio.check_output(args.out_dir, folder=True)
    if args.logs:
        runs = [(name, read_scalars(d)) for name, d in zip(run_names(args.logs), args.logs)]
        plot_training(runs, os.path.join(args.out_dir, "training_curves.png"))
    if args.ablation:
        report = fileio.read_json(args.ablation, "ablation JSON")
        if not report.get("groups") or not report.get("references"):
            raise InputError(f"{args.ablation}: no 'groups' and 'references' (expected the JSON written by ablation.py)")
        plot_ablation(report, os.path.join(args.out_dir, "ablation_daa.png"))


if __name__ == "__main__":
    sys.exit(errors.run(main))
