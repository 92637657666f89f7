"""What DAA does: the same training with DAA off, with the paper's DAA and with the released code's, over seeds.

    python ablation.py [--out_dir ablation_output] [--seeds 0 1 2] [--module_name SAF] [--daa_weight 1]
    python plot_results.py --ablation ablation_output/ablation.json --out_dir assets

On the demo's synthetic COCO (run_demo.SIZES["full"], written once into --out_dir), every setting is
trained with run_demo's CPU-sized options for each seed; only `--daa_weight 0` (off) or
`--daa_variant paper|reference` and `--seed` change (the seed sets the initial weights, dropout and
batch order; the data are the same for all runs). Each run is then scored on the whole testall split
by evaluation.py (R@1/5/10, ASP) and pmrp_evaluation.py --n_fold 0 (PMRP), both directions.
Writes {out_dir}/ablation.json and ablation.md: per-seed numbers, mean ± sample standard deviation
over seeds, and the difference of each DAA setting from DAA off paired by seed (same initial weights
and batch order), which is the more sensitive comparison.

A run whose PMRP JSON exists is finished (every output is written atomically) and is not redone, and
an interrupted training resumes from its last checkpoint, so an interrupted ablation continues where
it stopped; {out_dir}/settings.json guards against mixing
runs made with other settings.
"""
import glob
import os
import shutil
import sys

import numpy as np

import errors
import fileio
import run_demo
from errors import InputError

# (key, legend name, train.py options) of each setting; the DAA weight of the "on" settings is --daa_weight.
VARIANTS = (("off", "DAA off", lambda w: ["--daa_weight", 0]),
            ("paper", "DAA paper", lambda w: ["--daa_weight", w, "--daa_variant", "paper"]),
            ("reference", "DAA reference", lambda w: ["--daa_weight", w, "--daa_variant", "reference"]))
METRICS = ("r1", "r5", "r10", "asp", "pmrp")
HEADERS = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "asp": "ASP", "pmrp": "PMRP"}


def run_one(args, size, key, options, seed, data_path, vocab_path, ann_root, title):
    """Train, evaluate and PMRP one (setting, seed); returns {"i2t": {metric: value}, "t2i": {...}}."""
    name = f"{key}_seed{seed}"
    model_dir, log_dir = (os.path.join(args.out_dir, sub, name) for sub in ("runs", "logs"))
    sims, evaluation_json, pmrp_json = (os.path.join(args.out_dir, "eval", name + suffix)
                                        for suffix in (".npy", ".json", "_pmrp.json"))
    if not os.path.isfile(pmrp_json):
        training = {k: v for k, v in run_demo.TRAINING[size].items() if k != "daa_weight"}  # set by `options`
        if glob.glob(os.path.join(model_dir, "checkpoint_*.pth.tar")):
            options = list(options) + ["--resume", model_dir]  # train.py starts no new run over checkpoints
        elif os.path.isdir(log_dir):
            shutil.rmtree(log_dir)  # this script's run killed before its first checkpoint: only its log is left
        run_demo.run_script("train.py", run_demo.train_args(size, training, data_path, vocab_path, args.module_name,
                                                            model_dir, log_dir, seed, options),
                            f"{title}: train")
        run_demo.run_script("evaluation.py", ["--model_path", os.path.join(model_dir, "model_best.pth.tar"),
                                              "--data_path", data_path, "--vocab_path", vocab_path, "--split", "testall",
                                              "--save_sims", sims, "--json", evaluation_json], f"{title}: evaluate")
        run_demo.run_script("pmrp_evaluation.py", ["--path1", sims, "--n_fold", 0, "--ann_root", ann_root,
                                                   "--dataset_root", os.path.join(data_path, run_demo.DATA_NAME),
                                                   "--json", pmrp_json], f"{title}: PMRP")
    scores, pmrp = fileio.read_json(evaluation_json, "evaluation JSON"), fileio.read_json(pmrp_json, "PMRP JSON")
    return {d: {m: (pmrp if m == "pmrp" else scores)[d][m] for m in METRICS} for d in ("i2t", "t2i")}


def summarise(runs):
    """Mean and sample std (ddof 1; 0 for one run) over runs of {"i2t": {metric}, "t2i": {metric}} dicts."""
    def stat(fn):
        return {d: {m: float(fn(np.array([r[d][m] for r in runs]))) for m in METRICS} for d in ("i2t", "t2i")}
    return stat(np.mean), stat(lambda v: v.std(ddof=1) if len(v) > 1 else 0.0)


def markdown(report):
    """Mean ± std per setting, then each DAA setting minus DAA off (paired by seed)."""
    cols = [f"{d} {HEADERS[m]}" if m == "r1" else HEADERS[m] for d in ("i2t", "t2i") for m in METRICS]
    lines = ["| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = [(v["name"], v["mean"], v["std"]) for v in report["variants"]]
    rows += [(f"{v['name']} − DAA off", v["paired_difference"]["mean"], v["paired_difference"]["std"])
             for v in report["variants"] if "paired_difference" in v]
    for name, mean, std in rows:
        lines.append(f"| {name} | " + " | ".join(f"{mean[d][m]:.2f} ± {std[d][m]:.2f}"
                                                for d in ("i2t", "t2i") for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def build_parser():
    p = errors.ArgumentParser(description="DAA off / paper / reference over seeds on the synthetic data.")
    p.add_argument("--out_dir", default="ablation_output", help="data, runs, evaluations and the report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (>= 2 for a std)")
    p.add_argument("--module_name", default="SAF", choices=["SGR", "SAF"],
                   help="SAF by default: on a CPU it trains faster than SGR (86 s vs 117 s in the demo) "
                        "and learns this data a little better")
    p.add_argument("--daa_weight", type=float, default=run_demo.TRAINING["full"]["daa_weight"],
                   help="weight of each DAA term in the DAA-on settings (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="run_demo's tiny sizes (for tests; the numbers mean nothing)")
    p.add_argument("--in_process", action="store_true",
                   help="call each script's main() in this process instead of starting `python script.py`")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds: repeated seed in {args.seeds}")
    if args.daa_weight <= 0:
        raise InputError(f"--daa_weight must be positive for the DAA-on settings (got {args.daa_weight})")
    run_demo.IN_PROCESS = args.in_process
    size = "quick" if args.quick else "full"
    fileio.check_output(args.out_dir, folder=True)
    settings = {"size": size, "sizes": run_demo.SIZES[size], "training": run_demo.TRAINING[size],
                "module_name": args.module_name, "daa_weight": args.daa_weight}
    settings_path = os.path.join(args.out_dir, "settings.json")
    if os.path.isfile(settings_path):
        if fileio.read_json(settings_path, "settings file") != settings:
            raise InputError(f"{settings_path}: {args.out_dir} holds runs made with other settings; "
                             f"delete it or choose another --out_dir")
    else:
        fileio.write_json(settings, settings_path)

    data_path, vocab_path, ann_root = (os.path.join(args.out_dir, d) for d in ("data", "vocab", "coco_ann"))
    if not os.path.isfile(os.path.join(data_path, run_demo.DATA_NAME, "testall.h5")):  # np2h.py's last output
        run_demo.make_data(size, args.out_dir, lambda title: f"data: {title}")
    total = len(VARIANTS) * len(args.seeds)
    variants, results = [], {}
    for k, (key, name, options) in enumerate(VARIANTS):
        runs = []
        for s, seed in enumerate(args.seeds):
            title = f"[{k * len(args.seeds) + s + 1}/{total}] {name}, seed {seed}"
            runs.append(run_one(args, size, key, options(args.daa_weight), seed, data_path, vocab_path, ann_root, title))
        mean, std = summarise(runs)
        variants.append({"key": key, "name": name, "train_options": [str(o) for o in options(args.daa_weight)],
                         "runs": [dict(r, seed=seed) for r, seed in zip(runs, args.seeds)], "mean": mean, "std": std})
        results[key] = runs
    for variant in variants[1:]:  # paired by seed: same initial weights and batch order as the DAA-off run
        differences = [{d: {m: on[d][m] - off[d][m] for m in METRICS} for d in ("i2t", "t2i")}
                       for on, off in zip(results[variant["key"]], results["off"])]
        mean, std = summarise(differences)
        variant["paired_difference"] = {"mean": mean, "std": std}

    n_images = run_demo.SIZES[size]["n_testall"]
    report = {"scope": f"synthetic COCO testall, all {n_images} images", "seeds": args.seeds, "settings": settings,
              "variants": variants}
    fileio.write_json(report, os.path.join(args.out_dir, "ablation.json"))
    table = markdown(report)
    fileio.write_text(table, os.path.join(args.out_dir, "ablation.md"))
    print(f"\n{report['scope']}, {args.module_name}, DAA weight {args.daa_weight}, seeds {args.seeds} "
          f"(mean ± sample std over seeds)\n{table}\nwritten: {os.path.join(args.out_dir, 'ablation.json')}, "
          f"{os.path.join(args.out_dir, 'ablation.md')}")


if __name__ == "__main__":
    sys.exit(errors.run(main))
