"""What DAA does on the synthetic data, at the published weights, over seeds, against the data's yardsticks.

    python -m tools.ablation [--out_dir ablation_output] [--jobs 2] [--threads 1]
    python -m tools.plot_results --ablation ablation_output/ablation.json --out_dir assets

On the demo's synthetic COCO (run_demo.SIZES["full"], written once into --out_dir) and with the demo's
schedule (run_demo.TRAINING["full"]), GRID trains every (model, DAA weight, variant) for each seed;
only `--daa_weight`, `--daa_variant`, `--module_name` and `--seed` change (the seed sets the initial
weights, dropout and batch order; the data are the same for all runs). Each run is scored on the
whole testall split by evaluation.py (R@1/5/10, ASP) and pmrp_evaluation.py --n_fold 0 (PMRP).
The yardsticks (run_demo.save_reference_matrices: random and constant scores, the content oracle,
the relevance itself) are scored the same way, so each setting can be placed between the DAA-off
model and the best an image-only model could do.

A second experiment, PLATEAU, measures the collapse at the start of hardest-negative training
without warm-up (every score nearly equal, hinge loss at 2 B m) for DAA weights 0 / 10 / 25: DAA's soft
ranks reward tied scores (asp_soft of a constant matrix is above that of random scores, measured in the
report), so DAA may hold the model in the collapse. Per run: the iteration where the hinge loss leaves
2 B m for good (if it does within the run), how far the last epoch's hinge loss sits above 2 B m (the
hardest negative outscoring the positive), and the dev rsum at the end; paired by seed with weight 0.

Writes {out_dir}/ablation.json and ablation.md: per-seed numbers, mean ± sample std, and each DAA
setting's difference from weight 0 paired by seed (same initial weights and batch order) with a 95 %
t-interval. A run whose last output (its PMRP JSON, or a plateau run's curves) exists is finished
(outputs are written atomically) and is not redone, so an interrupted ablation continues where it
stopped, also from the score files alone (checkpoints and matrices can be deleted); {out_dir}/settings.json guards against
mixing runs made with other settings. `--jobs K` trains K runs at a time, each in its own process
with cores / K threads (or --threads): the float sums, and so the runs, depend on the thread count.
"""
import multiprocessing
import os
import shutil
import sys

import numpy as np
import scipy.stats
import torch

import errors
import fileio
import run_demo
from errors import InputError
from tools import plot_results

DIRECTIONS = ("i2t", "t2i")
METRICS = ("r1", "r5", "r10", "asp", "pmrp")
HEADERS = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "asp": "ASP", "pmrp": "PMRP"}
# (model, DAA weights, variants, seeds[, noise rate[, binding]]) per size. The published recipes use weight 25 (COCO)
# and 10 (Flickr30K); 1 is the demo's. Weight 0 is DAA off, the same for either variant. Runs are made in
# the order listed, weight 0 and 25 first, so that a stopped ablation has the main comparison; the plateau
# runs come after the first PLATEAU_AFTER entries. Entries are only ever appended (the embedding models VSE
# and PCME came next, then tie_aware and the noisy data), so an ablation folder made with the shorter grid
# goes on with the new entries. A noise rate p trains on make_synthetic_data.py --noise_rate p's training
# captions (the same images, dev and testall), compared with DAA off on the same noisy data. A binding F other
# than make_synthetic_data.py's default draws the whole data set with --binding F (its own captions, vocabulary
# and testall, so its yardsticks are its own). A model is a --module_name or a name of MODEL_OPTIONS.
GRID = {
    "full": [("SAF", (0, 25), ("reference",), range(5)), ("SGR", (0, 25), ("reference",), range(3)),
             ("SAF", (25,), ("paper",), range(5)), ("SAF", (10, 1), ("reference", "paper"), range(5)),
             ("VSE", (0, 25), ("reference",), range(3)), ("PCME", (0, 25), ("reference",), range(3)),
             ("SGR", (25,), ("tie_aware",), range(3)), ("SAF", (25,), ("tie_aware",), range(5)),
             ("SAF", (0, 25), ("reference", "tie_aware"), range(3), 0.2),
             ("VSE", (25,), ("tie_aware",), range(3)), ("PCME", (25,), ("tie_aware",), range(3)),
             ("VSE", (0, 25), ("reference", "tie_aware"), range(3), 0.2), ("SAF", (10,), ("tie_aware",), range(5)),
             ("SAF", (0, 25), ("reference", "tie_aware"), range(3, 5), 0.2),
             ("VSE", (0, 25), ("reference", "tie_aware"), range(3, 6), 0.2),
             ("VSEgpo", (0,), ("reference",), range(1)), ("PCMEpp", (0,), ("reference",), range(1)),
             ("SAF", (0,), ("reference",), range(1), 0, 0.0), ("VSEgpo", (0,), ("reference",), range(1), 0, 0.0),
             ("PCMEpp", (0,), ("reference",), range(1), 0, 0.0), ("VSE", (0,), ("reference",), range(1), 0, 0.0),
             ("SAF", (0,), ("reference",), range(1), 0, 0.25), ("VSEgpo", (0,), ("reference",), range(1), 0, 0.25),
             ("SGR", (0,), ("reference",), range(1), 0, 0.25), ("SGR", (0,), ("reference",), range(1), 0, 0.0),
             ("VSEgpo", (0, 25), ("reference", "tie_aware"), range(3)),
             ("PCMEppCentred", (0, 25), ("reference", "tie_aware"), range(3)),
             ("SAF", (0,), ("reference",), range(1, 3), 0, 0.0), ("VSEgpo", (0,), ("reference",), range(1, 3), 0, 0.0),
             ("SGR", (0,), ("reference",), range(1, 3), 0, 0.0), ("PCMEppCentred", (0,), ("reference",), range(3), 0, 0.0),
             ("VSEgpo", (0, 25), ("reference", "tie_aware"), range(3), 0.2), ("PCMEpp", (0, 25), ("reference",), range(3)),
             ("PCMEppCentred", (0,), ("reference",), range(3), 0, 0.25), ("SAF", (0,), ("reference",), range(1, 3), 0, 0.25),
             ("SGR", (0,), ("reference",), range(1, 3), 0, 0.25)],
    "quick": [("SAF", (0, 25), ("reference",), range(2)), ("SAF", (25,), ("paper",), range(2)),
              ("VSE", (0, 25), ("reference",), range(1)), ("PCME", (0, 25), ("reference",), range(1)),
              ("SAF", (25,), ("tie_aware",), range(2)), ("SAF", (0, 25), ("tie_aware",), range(1), 0.2)],
}
PLATEAU_AFTER = 2
# Models that are a module with options of its own: VSE with VSE∞'s generalized pooling; PCME++ with each
# modality's pooled means centred (assets/embedding_models.md: plain PCME++ does not learn on this data).
MODEL_OPTIONS = {"VSEgpo": ("VSE", ("--vse_pool", "gpo")), "PCMEppCentred": ("PCMEpp", ("--pcmepp_center_means",))}
DEFAULT_BINDING = 0.5  # make_synthetic_data.py's --binding default: the data every other entry uses
# Plateau runs: SAF, no warm-up (hardest negatives from the first step, the original recipe), the lr of
# the published Flickr30K recipe held constant, logging every few iterations to time the collapse.
PLATEAU = {
    "full": {"weights": (0, 10, 25), "seeds": range(3),
             "training": {"warmup_epochs": 0, "learning_rate": 0.0006, "lr_update": 1000, "num_epochs": 8, "log_step": 5}},
    "quick": {"weights": (0, 25), "seeds": range(1),
              "training": {"warmup_epochs": 0, "learning_rate": 0.0006, "lr_update": 1000, "num_epochs": 2, "log_step": 1}},
}
# The collapse has ended at the first logged hinge loss below this share of 2 B m after which it stays there.
PLATEAU_LEVEL = 0.9
PLATEAU_STAY = 5  # logged points
MARGIN = 0.2  # train.py's default --margin, which every run here uses
PLATEAU_MEASURES = ("hinge_above_2Bm", "dev_rsum")


def setting_name(model, weight, variant, noise=0, binding=DEFAULT_BINDING):
    return (f"{model}_w{weight:g}" + (f"_{variant}" if weight else "") + (f"_noise{noise:g}" if noise else "")
            + (f"_binding{binding:g}" if binding != DEFAULT_BINDING else ""))


def module_args(model):
    """(--module_name, [its options]) of a GRID model."""
    module, options = MODEL_OPTIONS.get(model, (model, ()))
    return module, list(options)


def grid_runs(entries):
    """[(setting name, model, weight, variant, seed, noise rate, binding)] of GRID entries, in order; weight 0
    listed once."""
    runs, seen = [], set()
    for model, weights, variants, seeds, *data in entries:
        noise, binding = (list(data) + [0, DEFAULT_BINDING][len(data):])[:2]
        if noise and binding != DEFAULT_BINDING:
            raise ValueError(f"GRID entry {model}: noise and another binding together are not made")
        for seed in seeds:
            for weight in weights:
                for variant in variants:
                    name = setting_name(model, weight, variant, noise, binding)
                    if (name, seed) not in seen:
                        seen.add((name, seed))
                        runs.append((name, model, weight, variant, seed, noise, binding))
    return runs


def data_roots(size):
    """[(folder under out_dir, noise rate, binding)] of every data set GRID[size] trains on, the default first."""
    data = {(run[5], run[6]) for run in grid_runs(GRID[size])} | {(0, DEFAULT_BINDING)}
    return sorted(((data_folder(noise, binding), noise, binding) for noise, binding in data), key=lambda d: d[0])


def data_folder(noise, binding):
    """Where a data set lives under out_dir ("" for the default): noise{p}/ or binding{F}/, each holding
    data/, vocab/, coco_ann/."""
    return f"noise{noise:g}" if noise else (f"binding{binding:g}" if binding != DEFAULT_BINDING else "")


def data_of(out_dir, noise, binding):
    """{"train", "evaluate", "vocab", "ann"} folders of a data set: noisy data trains on its own captions and is
    evaluated on the clean testall (which the noise never touches) with the clean vocabulary; another binding
    is a data set of its own throughout."""
    clean = os.path.join(out_dir, data_folder(0, binding))
    return {"train": os.path.join(out_dir, data_folder(noise, binding), "data"), "evaluate": os.path.join(clean, "data"),
            "vocab": os.path.join(clean, "vocab"), "ann": os.path.join(clean, "coco_ann")}


def plateau_runs(size):
    return [(f"plateau_SAF_w{w:g}", "SAF", w, "reference", seed, 0, DEFAULT_BINDING) for seed in PLATEAU[size]["seeds"]
            for w in PLATEAU[size]["weights"]]


def paths(out_dir, name, seed):
    """Where one run keeps its checkpoints, logs, similarity matrix and the two score files."""
    run = f"{name}_seed{seed}"
    return {"model": os.path.join(out_dir, "runs", run), "log": os.path.join(out_dir, "logs", run),
            "sims": os.path.join(out_dir, "eval", run + ".npy"),
            "evaluation": os.path.join(out_dir, "eval", run + ".json"),
            "pmrp": os.path.join(out_dir, "eval", run + "_pmrp.json"),
            "curve": os.path.join(out_dir, "eval", run + "_plateau.json"),
            "dev": os.path.join(out_dir, "eval", run + "_dev.json")}


def dev_rsum(where):
    """The run's best end-of-epoch dev rsum (what model_best was chosen by; settings are compared on it, never
    on testall), kept in its own small file beside the scores: written from model_best the first time,
    None for a run whose checkpoints are gone and that has no such file (the runs saved before it existed)."""
    if not os.path.isfile(where["dev"]):
        best = os.path.join(where["model"], "model_best.pth.tar")
        if not os.path.isfile(best):
            return None
        import checkpoint
        fileio.write_json({"dev_rsum": checkpoint.load_checkpoint(best)["best_rsum"]}, where["dev"])
    return fileio.read_json(where["dev"], "dev score file")["dev_rsum"]


def score(run, sims, evaluation_json, pmrp_json, data_path, ann_root, title):
    """evaluation.py --sims and pmrp_evaluation.py --n_fold 0 of a saved matrix, unless already done."""
    if not os.path.isfile(evaluation_json):
        run("evaluation.py", ["--sims", sims, "--data_path", data_path, "--data_name", run_demo.DATA_NAME,
                              "--split", "testall", "--json", evaluation_json], f"{title}: evaluate")
    if not os.path.isfile(pmrp_json):
        run("pmrp_evaluation.py", ["--path1", sims, "--n_fold", 0, "--ann_root", ann_root, "--json", pmrp_json,
                                   "--dataset_root", os.path.join(data_path, run_demo.DATA_NAME)], f"{title}: PMRP")


def read_scores(evaluation_json, pmrp_json):
    """{"i2t": {metric: value}, "t2i": {...}} from the two JSON files of one matrix."""
    scores, pmrp = fileio.read_json(evaluation_json, "evaluation JSON"), fileio.read_json(pmrp_json, "PMRP JSON")
    return {d: {m: (pmrp if m == "pmrp" else scores)[d][m] for m in METRICS} for d in DIRECTIONS}


def finished(where, plateau):
    """A run is done when its last output exists: the PMRP JSON, or for a plateau run its curves."""
    return os.path.isfile(where["curve"] if plateau else where["pmrp"])


def train(run, out_dir, size, spec, training, title):
    """Train one run (spec = (name, model, weight, variant, seed, noise, binding)) with `training`'s options into
    its folders under out_dir, unless its last checkpoint is there; returns paths(...) of the run."""
    name, model, weight, variant, seed, noise, binding = spec
    where = paths(out_dir, name, seed)
    last = os.path.join(where["model"], f"checkpoint_{training['num_epochs'] - 1}.pth.tar")
    if not os.path.isfile(last):
        for folder in (where["model"], where["log"]):  # an interrupted run starts again
            shutil.rmtree(folder, ignore_errors=True)
        data = data_of(out_dir, noise, binding)
        module, options = module_args(model)
        run("train.py", run_demo.train_args(size, training, data["train"], data["vocab"], module, where["model"],
                                            where["log"], seed, ["--daa_variant", variant] + options),
            f"{title}: train")
    return where


def execute(job):
    """Train and score one run: job = (out_dir, size, run, plateau, in_process, threads, title)."""
    out_dir, size, spec, plateau, in_process, threads, title = job
    torch.set_num_threads(threads)
    run = run_demo.Runner(in_process, threads)
    where = paths(out_dir, spec[0], spec[4])
    if finished(where, plateau):
        return
    data = data_of(out_dir, spec[5], spec[6])
    training = dict(run_demo.TRAINING[size], daa_weight=spec[2])
    if plateau:
        training.update(PLATEAU[size]["training"])
    train(run, out_dir, size, spec, training, title)
    if plateau:
        scalars = plot_results.read_scalars(where["log"])
        (steps, hinge), (val_steps, rsum) = scalars["contrastive_loss"], scalars["r_sum"]
        fileio.write_json({"steps": steps.tolist(), "contrastive_loss": hinge.tolist(),
                           "validation_steps": val_steps.tolist(), "r_sum": rsum.tolist()}, where["curve"])
        return
    if not os.path.isfile(where["sims"]):
        run("evaluation.py", ["--model_path", os.path.join(where["model"], "model_best.pth.tar"), "--data_path",
                              data["evaluate"], "--vocab_path", data["vocab"], "--split", "testall", "--save_sims",
                              where["sims"]], f"{title}: similarities")
    score(run, where["sims"], where["evaluation"], where["pmrp"], data["evaluate"], data["ann"], title)


def run_all(jobs, n_parallel):
    """Make every run of `jobs`, one after the other, or n_parallel at a time in worker processes."""
    if n_parallel == 1:
        for job in jobs:
            execute(job)
        return
    # a fresh process per run (maxtasksperchild=1): nothing one training leaves behind reaches the next
    with multiprocessing.get_context("spawn").Pool(n_parallel, maxtasksperchild=1) as pool:
        for _ in pool.imap_unordered(execute, jobs):
            pass


def t_interval(values):
    """{"n", "mean", "std" (sample; 0 for one value), "ci95_low", "ci95_high" (95 % t-interval; None for one
    value)} of a 1-D sequence."""
    values = np.asarray(values, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": 0.0, "ci95_low": None, "ci95_high": None}
    std = float(values.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def summarise(runs):
    """t_interval of every metric over run dicts {"i2t": {metric}, "t2i": {metric}}, as {"n", "mean": {"i2t":
    {metric}, "t2i": {...}}, "std", "ci95_low", "ci95_high"} (the last two None for one run)."""
    stats = {d: {m: t_interval([r[d][m] for r in runs]) for m in METRICS} for d in DIRECTIONS}
    summary = {"n": len(runs)}
    for key in ("mean", "std", "ci95_low", "ci95_high"):
        summary[key] = {d: {m: stats[d][m][key] for m in METRICS} for d in DIRECTIONS}
    if len(runs) < 2:  # no interval from one run
        summary["ci95_low"] = summary["ci95_high"] = None
    return summary


def paired(on, off):
    """summarise of the per-seed differences on - off (lists of run dicts, same seeds)."""
    return summarise([{d: {m: a[d][m] - b[d][m] for m in METRICS} for d in DIRECTIONS} for a, b in zip(on, off)])


def full_batch_points(steps, values, iterations_per_epoch):
    """The logged points (steps, values) less those of each epoch's last batch, which may be smaller."""
    steps, values = np.asarray(steps), np.asarray(values)
    keep = steps % iterations_per_epoch != 0
    return steps[keep], values[keep]


def plateau_length(steps, values, batch_size, margin):
    """Iterations until the hinge loss (values at steps, full batches) leaves the collapse (2 B m) for good,
    or None if it never did."""
    values = np.asarray(values)
    below = values < PLATEAU_LEVEL * 2 * batch_size * margin
    for k in range(len(values)):
        if below[k:k + PLATEAU_STAY].all() and k + PLATEAU_STAY <= len(values):
            return int(steps[k])
    return None


def plateau_measures(curve, batch_size, iterations_per_epoch):
    """One plateau run's curves -> its plateau length, the last epoch's mean hinge loss above 2 B m, the last dev rsum."""
    steps, hinge = full_batch_points(curve["steps"], curve["contrastive_loss"], iterations_per_epoch)
    last_epoch = steps > steps[-1] - steps[-1] % iterations_per_epoch
    return {"plateau_iterations": plateau_length(steps, hinge, batch_size, MARGIN),
            "hinge_above_2Bm": float(hinge[last_epoch].mean() - 2 * batch_size * MARGIN),
            "dev_rsum": float(curve["r_sum"][-1])}


def tie_reward(data_path, batch=128, seed=0):
    """DAA's surrogate on one training batch of relevance M: asp_soft of constant, random and perfect scores.

    paper's soft ranks take sigma(0) = 1/2 for a tie, i.e. average ranks, so a constant matrix scores above
    random ones; the metric ASP gives ties no credit (both about 0.5), and neither does tie_aware.
    """
    import evaluation
    from daa_loss import asp_soft

    relevance, _ = evaluation.relevance_of_split(data_path, run_demo.DATA_NAME, "train")
    captions = np.random.default_rng(seed).choice(relevance.n_captions, size=batch, replace=False)
    M = torch.from_numpy(relevance.block(captions // 5, captions))
    S = {"constant": torch.full_like(M, 0.5), "random": torch.rand(M.shape, generator=torch.Generator().manual_seed(seed)),
         "relevance": M}
    return {"batch": batch, "asp_soft": {name: float(asp_soft(s, M, variant="paper")) for name, s in S.items()},
            "asp_soft_tie_aware": {name: float(asp_soft(s, M, variant="tie_aware")) for name, s in S.items()},
            "asp": {name: evaluation.asp(s.numpy(), M.numpy()) / 100 for name, s in S.items()}}


def report_of(args, size, settings):
    """The ablation report from the finished runs' files (a setting lists the seeds finished so far)."""
    data_path = os.path.join(args.out_dir, "data")

    def references_of(binding):  # the yardsticks of a data set's testall
        stems = {name: os.path.join(args.out_dir, data_folder(0, binding), "eval", name.replace(" ", "_"))
                 for name in run_demo.REFERENCES}
        return {name: read_scores(stem + ".json", stem + "_pmrp.json") for name, stem in stems.items()}

    references = references_of(DEFAULT_BINDING)
    groups, by_setting = [], {}
    for name, model, weight, variant, seed, noise, binding in grid_runs(GRID[size]):
        group = by_setting.get(name)
        if group is None:
            group = by_setting[name] = {"key": name, "module": model, "daa_weight": weight,
                                        "variant": variant if weight else None, "noise_rate": noise,
                                        "binding": binding, "runs": []}
            groups.append(group)
        where = paths(args.out_dir, name, seed)
        if finished(where, plateau=False):
            group["runs"].append(dict(read_scores(where["evaluation"], where["pmrp"]), seed=seed, dev_rsum=dev_rsum(where)))
    groups = [g for g in groups if g["runs"]]
    other_bindings = {g["binding"] for g in groups} - {DEFAULT_BINDING}
    references_by_binding = {b: references_of(b) for b in other_bindings} | {DEFAULT_BINDING: references}
    for group in groups:
        summary = summarise(group["runs"])
        group["mean"], group["std"] = summary["mean"], summary["std"]
        oracle = references_by_binding[group["binding"]]["content oracle"]
        off = by_setting[setting_name(group["module"], 0, None, group["noise_rate"], group["binding"])]
        if group is not off:
            off_by_seed = {r["seed"]: r for r in off["runs"]}
            on = [r for r in group["runs"] if r["seed"] in off_by_seed]
            group["paired_difference"] = paired(on, [off_by_seed[r["seed"]] for r in on])
        devs = [r["dev_rsum"] for r in group["runs"] if r["dev_rsum"] is not None]
        group["dev_rsum"] = t_interval(devs) if devs else None
        # Share of the ASP headroom between the DAA-off model and the content oracle that the setting covers.
        group["asp_headroom_covered"] = {d: 100 * (group["mean"][d]["asp"] - off["mean"][d]["asp"])
                                         / (oracle[d]["asp"] - off["mean"][d]["asp"]) for d in DIRECTIONS}
    training = dict(run_demo.TRAINING[size], **PLATEAU[size]["training"])
    curves = {(w, seed): fileio.read_json(paths(args.out_dir, name, seed)["curve"], "plateau curves")
              for name, _, w, _, seed, _, _ in plateau_runs(size) if finished(paths(args.out_dir, name, seed), plateau=True)}
    # train.py validates at the end of every epoch (and only then, here): the first validation's step is the
    # number of iterations in an epoch, the last of which may be a smaller batch
    iterations_per_epoch = next((curve["validation_steps"][0] for curve in curves.values()), None)
    plateau = []
    for weight in PLATEAU[size]["weights"]:
        runs = [dict(plateau_measures(curve, training["batch_size"], iterations_per_epoch), seed=seed)
                for (w, seed), curve in curves.items() if w == weight]
        entry = {"daa_weight": weight, "runs": runs}
        if runs:
            for m in PLATEAU_MEASURES:
                spread = t_interval([r[m] for r in runs])
                entry[m] = {"mean": spread["mean"], "std": spread["std"]}
        plateau.append(entry)
    off = {r["seed"]: r for r in plateau[0]["runs"]}
    for entry in plateau[1:]:
        on = [r for r in entry["runs"] if r["seed"] in off]
        if on:
            entry["paired_difference"] = {m: t_interval([r[m] - off[r["seed"]][m] for r in on]) for m in PLATEAU_MEASURES}
    n_images = run_demo.SIZES[size]["n_testall"]
    return {"scope": f"synthetic COCO testall, all {n_images} images", "settings": settings, "references": references,
            "references_by_binding": {f"{b:g}": references_by_binding[b] for b in sorted(other_bindings)},
            "groups": groups, "plateau": {"training": training, "level": PLATEAU_LEVEL, "stay": PLATEAU_STAY,
                                          "iterations_per_epoch": iterations_per_epoch, "weights": plateau},
            "tie_reward": tie_reward(data_path)}


def markdown(report):
    """The yardsticks, mean ± std per setting, the paired differences with their 95 % intervals, the plateau."""
    cols = [f"{d} {HEADERS[m]}" if m == "r1" else HEADERS[m] for d in DIRECTIONS for m in METRICS]
    head = ["| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines = ["Mean ± sample std over seeds (n = seeds); yardsticks on the same split.", ""] + head
    yardsticks = [("", report["references"])] + [(f", binding {b}", refs)
                                                  for b, refs in report.get("references_by_binding", {}).items()]
    for data, references in yardsticks:
        for name, scores in references.items():
            lines.append(f"| {name}{data} | " + " | ".join(f"{scores[d][m]:.2f}" for d in DIRECTIONS for m in METRICS) + " |")
    for g in report["groups"]:
        lines.append(f"| {label(g)} (n={len(g['runs'])}) | " + " | ".join(
            f"{g['mean'][d][m]:.2f} ± {g['std'][d][m]:.2f}" for d in DIRECTIONS for m in METRICS) + " |")
    lines += ["", "Difference from DAA off (weight 0), paired by seed: mean [95 % t-interval].", ""] + head
    for g in report["groups"]:
        if "paired_difference" in g:
            p = g["paired_difference"]
            lines.append(f"| {label(g)} − off (n={p['n']}) | " + " | ".join(
                f"{p['mean'][d][m]:+.2f} " + (f"[{p['ci95_low'][d][m]:+.2f}, {p['ci95_high'][d][m]:+.2f}]"
                                              if p["ci95_low"] else "[one pair]")
                for d in DIRECTIONS for m in METRICS) + " |")
    lines += ["", "Share of the ASP headroom (DAA off → content oracle) covered, i2t / t2i:", ""]
    lines += [f"- {label(g)}: {g['asp_headroom_covered']['i2t']:.1f} % / {g['asp_headroom_covered']['t2i']:.1f} %"
              for g in report["groups"] if g["daa_weight"]]
    lines += ["", "Dev rsum of each run's model_best, mean ± std (n = runs that have it: the runs saved before "
              "2026-12-06 kept no checkpoint); settings are chosen on it, not on the testall rows above:", ""]
    lines += [f"- {label(g)}: {g['dev_rsum']['mean']:.1f} ± {g['dev_rsum']['std']:.1f} (n={g['dev_rsum']['n']})"
              for g in report["groups"] if g.get("dev_rsum")]
    p = report["plateau"]
    lines += ["", f"Collapse without warm-up (SAF, lr {p['training']['learning_rate']}, batch {p['training']['batch_size']}, "
              f"{p['training']['num_epochs']} epochs of {p['iterations_per_epoch']} iterations): the iteration where the "
              f"hinge loss stays below {p['level']} × 2Bm (— = not within the run); the last epoch's hinge loss above "
              f"2Bm and the last dev rsum, mean ± std, and their difference from weight 0 paired by seed [95 % t-interval]:",
              ""]
    for w in p["weights"]:
        if not w["runs"]:
            continue
        line = (f"- DAA weight {w['daa_weight']:g}: left the collapse at " + ", ".join(
            "—" if r["plateau_iterations"] is None else str(r["plateau_iterations"]) for r in w["runs"])
            + f" (seeds {', '.join(str(r['seed']) for r in w['runs'])}); hinge above 2Bm "
            f"{w['hinge_above_2Bm']['mean']:.4f} ± {w['hinge_above_2Bm']['std']:.4f}, dev rsum "
            f"{w['dev_rsum']['mean']:.1f} ± {w['dev_rsum']['std']:.1f}")
        if "paired_difference" in w:
            digits = {"hinge_above_2Bm": 4, "dev_rsum": 1}
            line += "; − weight 0: " + ", ".join(
                f"{m} {d['mean']:+.{digits[m]}f} " + (f"[{d['ci95_low']:+.{digits[m]}f}, {d['ci95_high']:+.{digits[m]}f}]"
                                                      if d["ci95_low"] is not None else "[one pair]")
                for m, d in w["paired_difference"].items())
        lines.append(line)
    t = report["tie_reward"]
    lines += ["", f"DAA's surrogate rewards ties (one training batch of {t['batch']}): asp_soft constant "
              f"{t['asp_soft']['constant']:.3f}, random {t['asp_soft']['random']:.3f}, relevance "
              f"{t['asp_soft']['relevance']:.3f}; the metric ASP: constant {t['asp']['constant']:.3f}, random "
              f"{t['asp']['random']:.3f}; tie_aware's asp_soft: constant {t['asp_soft_tie_aware']['constant']:.3f}, "
              f"random {t['asp_soft_tie_aware']['random']:.3f}, relevance {t['asp_soft_tie_aware']['relevance']:.3f}."]
    return "\n".join(lines) + "\n"


def label(group):
    noise = f", noise {group['noise_rate']:g}" if group.get("noise_rate") else ""
    if group.get("binding", DEFAULT_BINDING) != DEFAULT_BINDING:
        noise += f", binding {group['binding']:g}"
    if not group["daa_weight"]:
        return f"{group['module']}, DAA off{noise}"
    return f"{group['module']}, DAA {group['daa_weight']:g} {group['variant']}{noise}"


def extends(settings, stored):
    """Whether `settings` are the `stored` ones of an ablation folder, or the same with grid entries appended
    (its finished runs then belong to the new grid as well)."""
    grid = stored.get("grid", [])
    return dict(settings, grid=grid) == stored and settings["grid"][:len(grid)] == grid


def build_parser():
    p = errors.ArgumentParser(description="DAA weight x variant x seed on the synthetic data, plus the collapse "
                                          "plateau; yardsticks from the content oracle.")
    p.add_argument("--out_dir", default="ablation_output", help="data, runs, evaluations and the report")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at a time, each in its own process with cores / jobs threads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default cores / jobs); the saved runs used 1, and the scores "
                        "reproduce bit for bit only at the same count")
    p.add_argument("--quick", action="store_true", help="run_demo's tiny sizes and a small grid (for tests)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: write the report from the runs finished so far (e.g. of a stopped ablation)")
    p.add_argument("--in_process", action="store_true",
                   help="with --jobs 1: call each script's main() in this process instead of `python script.py`")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise InputError(f"--jobs must be at least 1 (got {args.jobs})")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1 (got {args.threads})")
    size = "quick" if args.quick else "full"
    run_script = run_demo.Runner(args.in_process)
    fileio.check_output(args.out_dir, folder=True)
    plateau = dict(PLATEAU[size], weights=list(PLATEAU[size]["weights"]), seeds=list(PLATEAU[size]["seeds"]))
    settings = {"size": size, "sizes": run_demo.SIZES[size], "training": run_demo.TRAINING[size],
                "grid": [[m, list(w), list(v), list(s), *noise] for m, w, v, s, *noise in GRID[size]], "plateau": plateau}
    settings_path = os.path.join(args.out_dir, "settings.json")
    if os.path.isfile(settings_path):
        stored = fileio.read_json(settings_path, "settings file")
        if not extends(settings, stored):
            raise InputError(f"{settings_path}: {args.out_dir} holds runs made with other settings; "
                             f"delete it or choose another --out_dir")
    fileio.write_json(settings, settings_path)

    for folder, noise, binding in data_roots(size):
        root = os.path.join(args.out_dir, folder)
        if not os.path.isfile(os.path.join(root, "data", run_demo.DATA_NAME, "testall.h5")):  # np2h.py's last output
            run_demo.make_data(size, root, lambda title: f"data: {title}", run_script, noise, binding)
        if noise:  # evaluated on the clean data's testall, against its yardsticks
            continue
        data = data_of(args.out_dir, noise, binding)
        for name, path in run_demo.save_reference_matrices(size, root, data["evaluate"], binding).items():
            stem = path[:-len(".npy")]
            score(run_script, path, stem + ".json", stem + "_pmrp.json", data["evaluate"], data["ann"], name)

    entries = GRID[size]
    runs = ([(run, False) for run in grid_runs(entries[:PLATEAU_AFTER])] + [(run, True) for run in plateau_runs(size)]
            + [(run, False) for run in grid_runs(entries[PLATEAU_AFTER:])])
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    # a worker process makes its runs in-process: no interpreter start-up per step
    in_process = args.in_process or args.jobs > 1
    # finished runs are left out here, not in the workers: each job starts a fresh process (torch imported anew)
    jobs = [(args.out_dir, size, run, plateau, in_process, threads, f"[{k + 1}/{len(runs)}] {run[0]}, seed {run[4]}")
            for k, (run, plateau) in enumerate(runs) if not finished(paths(args.out_dir, run[0], run[4]), plateau)]
    if not args.report_only:
        run_all(jobs, args.jobs)

    report = report_of(args, size, settings)
    fileio.write_json(report, os.path.join(args.out_dir, "ablation.json"))
    table = markdown(report)
    fileio.write_text(table, os.path.join(args.out_dir, "ablation.md"))
    print(f"\n{report['scope']}\n{table}\nwritten: {os.path.join(args.out_dir, 'ablation.json')}, "
          f"{os.path.join(args.out_dir, 'ablation.md')}")


if __name__ == "__main__":
    sys.exit(errors.run(main))
