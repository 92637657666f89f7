"""How much of the noise a model learns: the noisy training pairs it fits, against the truth it keeps, per epoch.

    python -m tools.noise_diagnosis [--out_dir ablation_output] [--module VSE] [--noise 0.2] [--threads 1]

Reads the ablation's runs (tools.ablation) on the data with noise rate --noise: DAA off, `reference` 25 and
`tie_aware` 25, every seed whose checkpoints are there. For the weights at the end of every epoch
(checkpoint_{epoch}) it scores the whole noisy training split (the images against every caption they were
trained with) and measures, i2t:

- clean R@1: the share of the clean images whose first caption is one of their own;
- noise fitted: the share of the noisy images whose first caption is one they were given by the noise
  (another image's), i.e. the noise the model has learned as if it were true;
- truth kept: the share of the noisy images whose first caption is one of their true captions (which the noise
  gave to another image, so the model saw them only with the wrong image).

and the same t2i (a caption's first image: its own for clean captions; for a moved caption the image the noise
gave it to, or the image it describes). Which images are noisy is read from the files: the training captions
of the noisy data against those of the clean data (the same images), not from the maker's code.

Writes {out_dir}/noise_diagnosis.json and .md: per run and epoch, and the differences tie_aware − reference
and reference − off at the best epoch's weights (model_best), paired by seed with 95 % t-intervals.
"""
import os
import sys

import numpy as np
import torch

import data
import errors
import evaluation
import fileio
import run_demo
from errors import InputError
from make_synthetic_data import CAPTIONS_PER_IMAGE
from tools import ablation

MEASURES = ("clean_r1", "noise_fitted", "truth_kept")
VARIANTS = ((0, "reference"), (25, "reference"), (25, "tie_aware"))  # (DAA weight, variant): the ablation's rows


def read_caption_blocks(data_path):
    """The training captions, one tuple of CAPTIONS_PER_IMAGE lines per image."""
    lines = data.read_captions(data_path, run_demo.DATA_NAME, "train")
    return [tuple(lines[k:k + CAPTIONS_PER_IMAGE]) for k in range(0, len(lines), CAPTIONS_PER_IMAGE)]


def noise_of(clean_path, noisy_path):
    """(noisy images (n,), their true captions' image in the noisy split (n,)): image noisy[k]'s own captions
    were given to image holder[k]. Read from the two caption files."""
    clean, noisy = read_caption_blocks(clean_path), read_caption_blocks(noisy_path)
    if len(clean) != len(noisy):
        raise InputError(f"{noisy_path}: {len(noisy)} training images against {len(clean)} in {clean_path}")
    changed = np.array([k for k in range(len(clean)) if clean[k] != noisy[k]])
    holder_of = {block: k for k, block in enumerate(noisy) if k in set(changed.tolist())}
    return changed, np.array([holder_of[clean[k]] for k in changed])


def fit_measures(sims, noisy, holder):
    """{direction: {measure: %}} of one (n_images, 5 n_images) matrix of the noisy training split."""
    n = sims.shape[0]
    is_noisy = np.zeros(n, dtype=bool)
    is_noisy[noisy] = True
    top_caption_image = sims.argmax(axis=1) // CAPTIONS_PER_IMAGE  # (n,): whose captions come first
    top_image = sims.argmax(axis=0)  # (5 n,)
    caption_image = np.arange(sims.shape[1]) // CAPTIONS_PER_IMAGE  # the image a caption was trained with
    true_image = np.arange(n)
    true_image[holder] = noisy  # the captions image holder[k] holds describe image noisy[k]
    moved = is_noisy[caption_image]
    return {"i2t": {"clean_r1": 100 * float((top_caption_image == np.arange(n))[~is_noisy].mean()),
                    "noise_fitted": 100 * float((top_caption_image[noisy] == noisy).mean()),
                    "truth_kept": 100 * float((top_caption_image[noisy] == holder).mean())},
            "t2i": {"clean_r1": 100 * float((top_image == caption_image)[~moved].mean()),
                    "noise_fitted": 100 * float((top_image == caption_image)[moved].mean()),
                    "truth_kept": 100 * float((top_image == true_image[caption_image])[moved].mean())}}


def score_checkpoint(path, data_path, vocab_path):
    """The checkpoint's (n_images, n_captions) scores of the training split at data_path."""
    args = evaluation.build_parser().parse_args(["--model_path", path, "--data_path", data_path, "--vocab_path",
                                                 vocab_path, "--split", "train"])
    sims, _, _, _ = evaluation.model_sims(args, path, whole=True)
    return sims


def diagnose(out_dir, module, noise):
    """{setting: {seed: [per-epoch measures, then model_best's]}} of the runs that are there."""
    data = ablation.data_of(out_dir, noise, ablation.DEFAULT_BINDING)
    noisy, holder = noise_of(data["evaluate"], data["train"])
    print(f"{len(noisy)} noisy training images of {len(read_caption_blocks(data['train']))}")
    report = {}
    for weight, variant in VARIANTS:
        name = ablation.setting_name(module, weight, variant, noise)
        for seed in range(100):
            folder = ablation.paths(out_dir, name, seed)["model"]
            if not os.path.isfile(os.path.join(folder, "model_best.pth.tar")):
                continue
            epochs = sorted(int(f[len("checkpoint_"):-len(".pth.tar")]) for f in os.listdir(folder)
                            if f.startswith("checkpoint_"))
            files = [f"checkpoint_{e}.pth.tar" for e in epochs] + ["model_best.pth.tar"]
            rows = [fit_measures(score_checkpoint(os.path.join(folder, f), data["train"], data["vocab"]), noisy, holder)
                    for f in files]
            report.setdefault(name, {})[seed] = {"epochs": rows[:-1], "best": rows[-1]}
            print(f"{name} seed {seed}: best " + ", ".join(
                f"{d} " + " ".join(f"{m} {rows[-1][d][m]:.1f}" for m in MEASURES) for d in ablation.DIRECTIONS))
    return report


def paired_best(report, on, off):
    """t_interval of on − off at model_best per (direction, measure), over the seeds both have."""
    seeds = sorted(set(report.get(on, {})) & set(report.get(off, {})))
    return {"seeds": seeds, "difference": {d: {m: ablation.t_interval(
        [report[on][s]["best"][d][m] - report[off][s]["best"][d][m] for s in seeds]) for m in MEASURES}
        for d in ablation.DIRECTIONS}} if seeds else None


def markdown(report, comparisons):
    head = "| run | epoch | " + " | ".join(f"{d} {m}" for d in ablation.DIRECTIONS for m in MEASURES) + " |"
    lines = ["Per run and epoch, on the noisy training split (%):", "", head, "|---" * (2 + 2 * len(MEASURES)) + "|"]
    for name, seeds in report.items():
        for seed, runs in seeds.items():
            for epoch, row in list(enumerate(runs["epochs"])) + [("best", runs["best"])]:
                lines.append(f"| {name} seed {seed} | {epoch} | " + " | ".join(
                    f"{row[d][m]:.1f}" for d in ablation.DIRECTIONS for m in MEASURES) + " |")
    lines += ["", "At model_best, paired by seed: mean [95 % t-interval]:", ""]
    for title, comparison in comparisons.items():
        if comparison:
            lines.append(f"- {title} (seeds {', '.join(map(str, comparison['seeds']))}): " + "; ".join(
                f"{d} {m} {c['mean']:+.1f} " + (f"[{c['ci95_low']:+.1f}, {c['ci95_high']:+.1f}]" if c["ci95_low"] is not None
                                                else "[one pair]")
                for d in ablation.DIRECTIONS for m, c in comparison["difference"][d].items()))
    return "\n".join(lines) + "\n"


def build_parser():
    p = errors.ArgumentParser(description="Noisy training pairs fitted and true pairs kept, per epoch, of the "
                                          "ablation's runs on noisy data.")
    p.add_argument("--out_dir", default="ablation_output", help="the ablation's folder (tools.ablation --out_dir)")
    p.add_argument("--module", default="VSE", help="the ablation's model whose noisy runs are measured")
    p.add_argument("--noise", type=float, default=0.2, help="the noise rate of the runs (an ablation GRID entry's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    report = diagnose(args.out_dir, args.module, args.noise)
    if not report:
        raise InputError(f"{args.out_dir}: no finished {args.module} runs with noise {args.noise:g}")
    names = {(w, v): ablation.setting_name(args.module, w, v, args.noise) for w, v in VARIANTS}
    comparisons = {"tie_aware − reference": paired_best(report, names[25, "tie_aware"], names[25, "reference"]),
                   "reference − off": paired_best(report, names[25, "reference"], names[0, "reference"]),
                   "tie_aware − off": paired_best(report, names[25, "tie_aware"], names[0, "reference"])}
    stem = os.path.join(args.out_dir, f"noise_diagnosis_{args.module}_noise{args.noise:g}")
    fileio.write_json({"runs": report, "paired_at_best": comparisons}, stem + ".json")
    fileio.write_text(markdown(report, comparisons), stem + ".md")
    print(markdown(report, comparisons)[-3000:])


if __name__ == "__main__":
    sys.exit(errors.run(main))
