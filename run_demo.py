"""The whole pipeline end to end on built-in synthetic data, one real script after another.

    python run_demo.py [--out_dir demo_output] [--quick] [--in_process] [--threads N]

Steps (each is the project's own script run as `python script.py ...`, printed before it runs, so
what you see is what you would type on real data):
  1. make_synthetic_data.py  a small COCO in the SCAN precomp layout + COCO-format annotations
  2. np2h.py                 {split}_ims.npy -> {split}.h5
  3. vocab.py                the vocabulary JSON from the train + dev captions
  4. train.py                SGR, SAF and the embedding model VSE, each with DAA (CPU-sized models, a few
                             epochs)
  5. evaluation.py           SGR, SAF, the SGRAF ensemble (--model_path + --model_path2) and VSE on testall:
                             1K (mean of 5 folds) and 5K (whole split), saving each similarity matrix
  6. pmrp_evaluation.py      PMRP of each matrix, 5 folds and whole split
     (steps 5-6 also score four yardsticks with --sims: random and constant scores, the content oracle
     that knows what each image holds, and the relevance M itself)
  7. tools/plot_results.py   training curves from the TensorBoard logs
and finally one table in the paper's shape: {out_dir}/results.md and results.json.

The synthetic testall has far fewer than 5,000 images (see SIZES), so "1K" means "mean over 5 folds
of n/5 images" and "5K" means "all n images", the same protocol at a smaller scale. The numbers
show that the pipeline learns (they are far above chance), not what the models reach on COCO.
--quick uses tiny sizes and two epochs (tests/test_demo.py); its numbers mean nothing.
Each run starts from scratch: the demo's own sub-folders of --out_dir are removed first (only in a
folder that an earlier demo run marked as its own, so a mistaken --out_dir never loses real data).
"""
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

import errors
import fileio
import opts
from errors import InputError

ROOT = os.path.dirname(os.path.abspath(__file__))
THREADED_SCRIPTS = ("train.py", "evaluation.py")  # the steps that take --threads

# Dataset sizes (images per split) and model/training settings. "full" takes about 7 minutes (7.1
# measured, with VSE) on an idle 2-core CPU, many times longer with the default threads when other jobs share the
# cores (--threads 1 then); "quick" well under a minute. A high learning rate with the violations summed
# (--warmup_epochs) learns fast; hardest-negative mining from the first step learns very slowly on small
# data, and switching to it at that high rate made SGR collapse (dev R@1 near 0) in our runs, hence the
# 10x lower rate from the switch on (--lr_update = --warmup_epochs).
SIZES = {
    "full": {"n_train": 1000, "n_dev": 100, "n_test": 50, "n_testall": 500, "feat_dim": 64},
    "quick": {"n_train": 40, "n_dev": 10, "n_test": 10, "n_testall": 25, "feat_dim": 32},
}
TRAINING = {
    "full": {"word_dim": 32, "embed_size": 64, "sim_dim": 32, "batch_size": 32, "num_epochs": 10,
             "learning_rate": 0.005, "warmup_epochs": 5, "lr_update": 5, "daa_weight": 1, "log_step": 20},
    "quick": {"word_dim": 16, "embed_size": 32, "sim_dim": 16, "batch_size": 16, "num_epochs": 2,
              "learning_rate": 0.005, "warmup_epochs": 1, "lr_update": 1, "daa_weight": 1, "log_step": 2},
}
DATA_NAME = "coco_precomp"
TRAINED = ("SGR", "SAF", "VSE")  # the demo's training runs, in order
MODELS = ("SAF", "SGR", "SGRAF", "VSE")  # row order of the paper's tables, then the embedding model
REFERENCES = ("random scores", "constant scores", "content oracle", "relevance M")  # save_reference_matrices
N_STEPS = 3 + len(TRAINED) + 3 * (len(MODELS) + len(REFERENCES)) + 1  # data, training, evaluation + 2 PMRP per matrix, plot
SUBDIRS = ("data", "vocab", "coco_ann", "runs", "logs", "eval")  # what a run writes (and removes first)
MARKER = ".run_demo"  # in --out_dir: its SUBDIRS were written by run_demo.py and may be removed


class Runner:
    """Runs the project's scripts as the demo's steps: `Runner(in_process, threads)(script, args, title)`.

    Each step is `python script args...` (tools as `python -m tools.name`), printed first and timed after;
    the child inherits the terminal, so its progress bars and messages appear as they would when typed.
    With in_process the script's main(argv) is called in this process instead (what the command would do,
    without a Python start-up and imports per step: the tests and the ablation's workers use it). With
    threads, train.py and evaluation.py get `--threads N`.
    """

    def __init__(self, in_process=False, threads=0):
        self.in_process, self.threads = in_process, threads

    def __call__(self, script, args, title):
        argv = [str(a) for a in args]
        if self.threads and script in THREADED_SCRIPTS:
            argv += ["--threads", str(self.threads)]
        module = os.path.splitext(script)[0].replace("/", ".")
        if "/" in script:  # a tool: a module of the tools package, run from the repository
            command, shown = [sys.executable, "-m", module], ["python", "-m", module]
        else:
            path = os.path.join(ROOT, script)
            command, shown = [sys.executable, path], ["python", os.path.relpath(path)]
        shown = shlex.join(shown + argv)
        print(f"\n{'=' * 8} {title}\n$ {shown}", flush=True)
        start = time.time()
        if self.in_process:
            status = errors.run(importlib.import_module(module).main, argv)
        else:
            environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
            status = subprocess.run(command + argv, env=environment).returncode
        if status:
            raise InputError(f"{script} exited with code {status} (its message is above); the command was: {shown}")
        print(f"({script}: {time.time() - start:.1f} s)", flush=True)


def train_args(size, training, data_path, vocab_path, module_name, model_dir, log_dir, seed=0, extra=()):
    """train.py's arguments for one CPU-sized run on the synthetic data."""
    args = ["--data_path", data_path, "--data_name", DATA_NAME, "--vocab_path", vocab_path,
            "--model_name", model_dir, "--logger_name", log_dir, "--module_name", module_name,
            "--img_dim", SIZES[size]["feat_dim"], "--seed", seed]
    for name, value in training.items():
        if module_name in opts.MODULE_OPTIONS.get(name, (module_name,)):  # e.g. no hinge warm-up for PCME
            args += [f"--{name}", value]
    return args + list(extra)


def maker_args(size, out_dir, binding=None):
    """make_synthetic_data.py's arguments for the demo's synthetic COCO under out_dir (with its --binding if given)."""
    data_path, vocab_path, ann_root = (os.path.join(out_dir, d) for d in ("data", "vocab", "coco_ann"))
    sizes = [a for name, value in SIZES[size].items() for a in (f"--{name}", value)]
    return (["--out_dir", data_path, "--vocab_dir", vocab_path, "--ann_dir", ann_root, "--datasets", DATA_NAME] + sizes
            + (["--binding", binding] if binding is not None else []))


def make_data(size, out_dir, step, run_script, noise_rate=0, binding=None):
    """Steps 1-3: synthetic COCO (with `noise_rate`'s noisy training pairs, and make_synthetic_data.py's
    --binding if given), HDF5 features, vocabulary. Returns (data_path, vocab_path, ann_root)."""
    data_path, vocab_path, ann_root = (os.path.join(out_dir, d) for d in ("data", "vocab", "coco_ann"))
    noise = ["--noise_rate", noise_rate] if noise_rate else []
    run_script("make_synthetic_data.py", maker_args(size, out_dir, binding) + noise, step("synthetic COCO"))
    run_script("np2h.py", ["--data_path", data_path, "--data_name", DATA_NAME], step("features to HDF5"))
    # The maker wrote a vocabulary already; vocab.py rebuilds it here exactly as for real captions. Not on noisy
    # captions: moved between images, they number the words in another first-seen order (the maker's vocabulary
    # is the clean captions', the same words and numbers as the clean data's).
    if not noise_rate:
        run_script("vocab.py", ["--data_path", data_path, "--data_name", DATA_NAME, "--vocab_path", vocab_path],
                   step("vocabulary"))
    return data_path, vocab_path, ann_root


def save_reference_matrices(size, out_dir, data_path, binding=None):
    """The yardsticks of the synthetic testall (made with make_synthetic_data.py's --binding if given), saved as
    {out_dir}/eval/{name}.npy: {row name: path}.

    random scores and a constant matrix (ASP about 50: no knowledge), the content oracle (the best an
    image-only model can do: make_synthetic_data.content_oracle) and the relevance M itself (ASP 100).
    """
    import evaluation
    import make_synthetic_data

    relevance, _ = evaluation.relevance_of_split(data_path, DATA_NAME, "testall")
    M = relevance.matrix()
    maker_opt = make_synthetic_data.build_parser().parse_args([str(a) for a in maker_args(size, out_dir, binding)])
    matrices = {"random scores": np.random.default_rng(0).random(M.shape).astype(np.float32),
                "constant scores": np.full(M.shape, 0.5, dtype=np.float32),
                "content oracle": make_synthetic_data.content_oracle(maker_opt), "relevance M": M}
    paths = {}
    for name, matrix in matrices.items():
        paths[name] = os.path.join(out_dir, "eval", name.replace(" ", "_") + ".npy")
        fileio.save_npy(matrix, paths[name])
    return paths


def direction_row(evaluation, pmrp, direction):
    """One direction of a table row: R@1/5/10 and ASP from evaluation.py's block, PMRP from pmrp_evaluation.py's."""
    return {"r1": evaluation[direction]["r1"], "r5": evaluation[direction]["r5"], "r10": evaluation[direction]["r10"],
            "pmrp": pmrp[direction]["pmrp"], "asp": evaluation[direction]["asp"]}


def results_table(rows):
    """The rows as a Markdown table in the shape of the paper's results tables."""
    head = ("| data | model | i2t R@1 | R@5 | R@10 | PMRP | ASP | t2i R@1 | R@5 | R@10 | PMRP | ASP |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    keys = ("r1", "r5", "r10", "pmrp", "asp")
    return head + "".join(
        f"| {row['data']} | {row['model']} | " + " | ".join(f"{row[d][k]:.1f}" for d in ("i2t", "t2i") for k in keys)
        + " |\n" for row in rows)


def build_parser():
    p = errors.ArgumentParser(description="End-to-end demo on synthetic COCO: data, training, evaluation, table.")
    p.add_argument("--out_dir", default="demo_output", help="everything the demo writes goes here")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 epochs (< 1 minute; for tests)")
    p.add_argument("--in_process", action="store_true",
                   help="call each script's main() in this process instead of starting `python script.py`")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of each training and evaluation (0: torch's default, one per core). Give 1 "
                        "on a machine shared with other jobs: two threads on two busy cores can run several "
                        "times slower. The numbers repeat on one machine at one thread count, not across them")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise InputError(f"--threads cannot be negative (got {args.threads})")
    run_script = Runner(args.in_process, args.threads)
    size = "quick" if args.quick else "full"
    fileio.check_output(args.out_dir, folder=True)
    out_dir = args.out_dir
    foreign = [sub for sub in SUBDIRS if os.path.exists(os.path.join(out_dir, sub))]
    if foreign and not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise InputError(f"{out_dir}: already holds {', '.join(foreign)} not written by run_demo.py; "
                         f"choose a new or empty --out_dir")
    for sub in foreign:
        shutil.rmtree(os.path.join(out_dir, sub))
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, MARKER), "w").close()
    start = time.time()
    done = []

    def step(title):
        done.append(title)
        return f"[{len(done)}/{N_STEPS}] {title}"

    data_path, vocab_path, ann_root = make_data(size, out_dir, step, run_script)
    coco_root = os.path.join(data_path, DATA_NAME)
    checkpoints = {}
    for module in TRAINED:
        model_dir = os.path.join(out_dir, "runs", module)
        run_script("train.py", train_args(size, TRAINING[size], data_path, vocab_path, module, model_dir,
                                          os.path.join(out_dir, "logs", module)), step(f"train {module} with DAA"))
        checkpoints[module] = os.path.join(model_dir, "model_best.pth.tar")

    files, rows = {}, []
    def evaluate(title, stem, matrix_args):
        """evaluation.py (1K and 5K) and pmrp_evaluation.py (5 folds, whole split) of eval/{stem}.npy,
        which `matrix_args(path)` makes (--save_sims) or reads (--sims); returns the files under out_dir."""
        names = {key: os.path.join("eval", stem + suffix) for key, suffix in
                 (("sims", ".npy"), ("evaluation", ".json"), ("pmrp_1k", "_pmrp_1k.json"), ("pmrp_5k", "_pmrp_5k.json"))}
        where = {key: os.path.join(out_dir, name) for key, name in names.items()}
        run_script("evaluation.py", matrix_args(where["sims"]) + ["--data_path", data_path, "--split", "testall",
                                                                  "--fold5", "--json", where["evaluation"]],
                   step(f"evaluate {title}: 1K and 5K"))
        for key, n_fold in (("pmrp_1k", 5), ("pmrp_5k", 0)):
            run_script("pmrp_evaluation.py", ["--path1", where["sims"], "--n_fold", n_fold, "--dataset_root", coco_root,
                                              "--ann_root", ann_root, "--json", where[key]],
                       step(f"PMRP of {title}, {'5 folds' if n_fold else 'whole split'}"))
        return names

    for model in MODELS:
        paths = [checkpoints["SGR"], checkpoints["SAF"]] if model == "SGRAF" else [checkpoints[model]]
        models = ["--model_path", paths[0]] + (["--model_path2", paths[1]] if len(paths) == 2 else [])
        files[model] = evaluate(model, model, lambda sims: models + ["--vocab_path", vocab_path, "--save_sims", sims])
    # The yardsticks, scored by the same commands: where the models stand between no knowledge and
    # everything an image can tell (content oracle) or the relevance itself.
    for name, path in save_reference_matrices(size, out_dir, data_path).items():
        stem = os.path.basename(path)[:-len(".npy")]
        files[name] = evaluate(f"the {name}", stem, lambda sims: ["--sims", sims, "--data_name", DATA_NAME])
    run_script("tools/plot_results.py", ["--logs"] + [os.path.join(out_dir, "logs", m) for m in TRAINED]
               + ["--out_dir", out_dir], step("training curves"))

    n_images = SIZES[size]["n_testall"]
    scopes = (("1K", f"COCO 1K: mean of 5 folds of {n_images // 5} images", "pmrp_1k", lambda e: e),
              ("5K", f"COCO 5K: all {n_images} images", "pmrp_5k", lambda e: e["all"]))
    for scope, label, pmrp_key, block in scopes:
        for model in MODELS + REFERENCES:
            evaluation = block(fileio.read_json(os.path.join(out_dir, files[model]["evaluation"]), "evaluation JSON"))
            pmrp = fileio.read_json(os.path.join(out_dir, files[model][pmrp_key]), "PMRP JSON")
            rows.append({"scope": scope, "data": label, "model": model,
                         "i2t": direction_row(evaluation, pmrp, "i2t"), "t2i": direction_row(evaluation, pmrp, "t2i")})
    wall = time.time() - start
    table = results_table(rows)
    note = (f"Synthetic COCO-layout data ({SIZES[size]['n_train']} training images, testall {n_images} images); "
            f"chance R@1 is {100 * 5 / n_images:.1f} (1K folds) and {100 / n_images:.1f} (5K). "
            f"R@K, ASP and PMRP in percent. Wall time {wall / 60:.1f} min.\n")
    fileio.write_json({"size": size, "sizes": SIZES[size], "training": TRAINING[size], "data_name": DATA_NAME,
                       "rows": rows, "files": files, "wall_time_s": round(wall, 1)},
                      os.path.join(out_dir, "results.json"))
    fileio.write_text(table + "\n" + note, os.path.join(out_dir, "results.md"))
    print(f"\n{table}\n{note}\nwritten: " + ", ".join(os.path.join(out_dir, name) for name in
                                              ("results.md", "results.json", "training_curves.png")))


if __name__ == "__main__":
    sys.exit(errors.run(main))
