"""Benchmark: the project's hot paths against plain baselines of the original algorithms, same inputs, one run.

    python -m tools.bench [--quick] [--device cpu|cuda] [--compile] [--cases CASE ...] [--out FILE.md]
                          [--shortlist_models SGR SAF SHORTLIST --shortlist_data D]

Every case times the project and its baseline (baselines/, the original's algorithm written plainly)
in this process, on the same inputs, reports the speed-up, the peak memory of each side and the max
abs difference of their outputs, and prints one Markdown table (also written to --out):

  similarity  SGR / SAF scores of every (image, caption) pair, eval mode, encoders excluded (both sides
              score the same embeddings): baselines/sim_loop.py in the original's 100 x 100 shards, one
              caption at a time, vs evaluation.similarity_block. --compile adds rows with the project's
              chunk function under torch.compile (compile time in the note).
  train       one training step at batch 128, SGR / SAF: forward + VSE++ + DAA loss + backward + gradient
              clipping + Adam step. Baseline: the caption loop + baselines/daa_direct.py; project:
              SimilarityModel + daa_loss.DAALoss. Dropout is off on both sides (p = 0) so that the two
              compute the same function; the diff is over the scores, the note gives the relative
              difference of the loss (a sum of magnitude ~50: fp32 rounding alone is ~4e-6 there) and of
              the gradients.
  daa         DAA loss alone at N = 128 / 256 / 512, forward + backward, both directions, the reference
              variant (train.py's default): daa_direct.daa_loss_direct (one N^3 tensor) vs
              daa_loss.DAALoss (blockwise); diff over the loss and the gradient.
  asp         exact ASP of an (n, 5n) matrix in both directions: baselines/asp_sort.py (the original's
              per-row double argsort) vs evaluation.asp. Scores and relevances are continuous (no ties),
              where the two definitions agree.
  pmrp        PMRP (n_fold 0, thresholds 0-2) of an (n, 5n) matrix, annotation reading excluded:
              baselines/pmrp_dict.py (PCME's ranking dict) vs pmrp_com.pmrp.pmrp_scores. The baseline
              cannot hold COCO 5K in 24 GB: it runs on two smaller subsets and is extrapolated. Then the
              whole process at the smaller size, start-up included (interpreter, imports, reading the
              matrix, the ids and a COCO-style instances file with pycocotools): `python pmrp_evaluation.py`
              vs a process that reads the same files the same way and runs pmrp_dict; memory = the
              process's peak RSS.
  tfidf       semantic relevance of COCO-train-many captions (566,435; Zipf words): baselines/
              tfidf_dense.py (dense TF-IDF + dense M) on two subsets, extrapolated, vs
              daa_loss.SemanticRelevance (sparse) at full size; diff on the larger subset.
  embedding   COCO-5K-sized evaluation of an embedding model (5,000 images x 25,000 captions, full dims,
              random weights and inputs, captions of COCO-like lengths), VSE and PCME (means' scoring):
              evaluation.compute_sims (each image and caption encoded once, blocks scored by matrix
              product) + R@K + ASP (evaluation.score_matrix, against a random relevance made beforehand)
              + PMRP (random category codes, as the pmrp case), end to end. The encoders' achieved GFLOP/s
              (analytic flops of the fc and the bi-GRU / their measured time) is in the note. Baseline: SGR's
              pairs/s on a small subset (encoders excluded), extrapolated to the 125 M pairs; there is no
              baseline to diff against, so the diff column is empty.
  np2h        a several-hundred-MB {split}_ims.npy to HDF5: the original's whole-file load vs np2h.convert
              (streamed); then both scaled to COCO train (31 GB), where the whole-file load cannot run.
  shortlist   two-stage retrieval (evaluation.py --shortlist) at COCO 5K (5,000 x 25,000), K = 10 / 50 / 100,
              against full SGRAF scoring, encoders excluded on both sides. SGR and SAF pairs/s measured
              on a subset (every pair of a block as plain evaluation scores it; and one call per image
              with as many captions as an image needs at 5K for that K, as evaluation.similarity_pairs
              scores them), times extrapolated to 125 M pairs and to the shortlist's pairs. The shortlist
              model stands in as VSE scores: a product of l2-normalised 1024-d embeddings (random, each
              caption its image's plus noise), measured at full size, as are the candidate masks (whose
              union gives the pairs) and the two-stage ranking. --shortlist_models SGR SAF SHORTLIST
              --shortlist_data D adds quality rows: plain SGRAF vs --shortlist_k K on D's testall.

Layout: this file is the command line, the runner, the table and the targets; tools/bench_common.py holds
the sizes, measurement, flop counts, rows and inputs; the cases are in bench_scoring.py (similarity, train,
daa), bench_metrics.py (asp, pmrp, tfidf, np2h), bench_embedding.py, bench_shortlist.py and bench_gallery.py
(large_gallery, with the ANN rows).

Memory: each side's peak RSS increase, in this process: before a measurement freed memory is handed
back to the OS (gc + malloc_trim) and the kernel's peak-RSS mark is reset to the current RSS (write
"5" to /proc/self/clear_refs); the peak is VmHWM - RSS at the start. It is exact (no sampling) but
Linux-only. On CUDA, torch cases report the peak of torch.cuda.max_memory_allocated over the start.
Time: the best of up to three runs (a run under a second is repeated; a training step runs once), the
torch cases after a small warm-up run.

Roofline column: the project's achieved GFLOP/s (flops / its time) as a share of this machine's sgemm rate,
measured in the same run (`sgemm_rate`: a square fp32 torch.mm of SGEMM_SIZE, BLAS sgemm on a CPU, best of
several, before and after the cases; the larger is 100 %), for every row that carries a flop count. The
table in assets/bench.md is run with `--threads 1`: one-thread rates on both sides of the share. The counts
are those of the matrix products the project computes (elementwise work, softmax, norms, DAA's sigmoid
comparisons and Adam are the overhead the share shows, not work); per pair of an image (R = 36 regions) and
a caption of L real words (N = L + 1 nodes; padding is overhead too), d = embed_size, s = sim_dim:

  attention 2RLd + context 2LRd + local Linear(d, s) 2Lds + global Linear(d, s) 2ds + score 2s, plus
  SGR    (sgr_step - 1) x [probe 2Ns(s + 1) + edge logits 2N^2 s + edges x nodes 2N^2 s + W_g 2Ns^2]
         + last step, node 0 alone: 2s(s + 1) + 2Ns + 2Ns + 2s^2  (and 2s^3 + 4s^2 + 2s per step and
         forward for the folded query-key weight);
  SAF    gate logits 2Ns + gated sum 2Ns;
  per image VisualSA 2Rd^2 + 2d^2 + 4Rd, per caption TextSA 2Ld^2 + 2d^2 + 4Ld.
At the bench's sizes (d = 1024, s = 256, L ~ 14) a pair is about 18.5 MFLOP for SGR, 9.9 for SAF.
A training step adds the encoders, image fc 2R img_dim d per image and the GRU 2 x 3(word_dim d + d^2) per
word and direction, and counts the backward as two products per forward product (gradients of its input
and of its weight), except the image fc, whose input needs none: step = 3 x forward - image fc. The local
alignment's backward recomputes the context (2LRd per pair) to save memory: overhead, not counted.
"""
import datetime
import gc
import os
import platform
import sys
import time

import threadpoolctl
import torch

import errors
import evaluation
import fileio
from errors import InputError
from tools import bench_common
from tools.bench_common import (CUDA_SIZES, MAX_RUNS, REPEAT_UNDER_S, SGEMM_SIZE, SIMILARITY_TOLERANCE, SIZES,
                                TOLERANCE, encoder_flops, extrapolate, model_options, row, sgemm_rate,
                                similarity_flops, train_step_flops)
from tools.bench_scoring import bench_daa, bench_similarity, bench_train
from tools.bench_metrics import bench_asp, bench_np2h, bench_pmrp, bench_tfidf
from tools.bench_embedding import bench_embedding
from tools.bench_shortlist import bench_shortlist
from tools.bench_gallery import ANN_K, LARGE_GALLERY_IMAGES, bench_large_gallery

CASES = ("similarity", "train", "daa", "asp", "pmrp", "tfidf", "embedding", "np2h", "shortlist")
EXTRA_CASES = ("large_gallery",)  # run only when named in --cases (the full size runs for many minutes)


# ------------------------------------------------------------------------------------------------
# Report


def _fmt_time(seconds, pairs, approx):
    mark = "≈ " if approx else ""
    if pairs:
        return f"{mark}{pairs / seconds:,.0f} pairs/s"
    return f"{mark}{seconds:.3g} s" if seconds < 100 else f"{mark}{seconds:,.0f} s"


def _fmt_mb(mb, approx, mem):
    mark = "≈ " if approx else ""
    text = f"{mb / 1024:,.1f} GB" if mb >= 1024 else f"{max(mb, 0):,.0f} MB"
    return f"{mark}{text}" + (" GPU" if mem == "GPU" else "")


def roofline(r, sgemm):
    """The project's achieved GFLOP/s of a row with a flop count and its share of the sgemm rate, else None."""
    if not r.get("flops") or not sgemm:
        return None
    rate = r["flops"] / r["proj_s"] / 1e9
    return rate, rate / sgemm


def format_table(rows, sgemm=None):
    """The Markdown table of all rows; `sgemm`: the sgemm rate (GFLOP/s) of the roofline column."""
    lines = ["| case | size | baseline | project | speed-up | project GFLOP/s (share of sgemm) | baseline peak | "
             "project peak | memory ratio | max abs diff | note |", "|" + "---|" * 11]
    for r in rows:
        achieved = roofline(r, sgemm)
        speedup = r["base_s"] / r["proj_s"]
        ratio = r["proj_mb"] / r["base_mb"] if r["base_mb"] > 1 and r["proj_mb"] > 0 else None
        ratio = "-" if ratio is None else f"{ratio:.2g}" if ratio < 10 else f"{ratio:,.0f}"
        diff = "-" if r["diff"] is None else f"{r['diff']:.1e}"
        lines.append(" | ".join([
            f"| {r['case']}", r["size"], _fmt_time(r["base_s"], r["pairs"], r["extrapolated"]),
            _fmt_time(r["proj_s"], r["pairs"], r["proj_extrapolated"]),
            f"{'≈ ' if r['extrapolated'] else ''}{speedup:,.{0 if speedup >= 100 else 1}f}x",
            "-" if achieved is None else f"{achieved[0]:.1f} ({100 * achieved[1]:.0f} %)",
            _fmt_mb(r["base_mb"], r["extrapolated"], r["mem"]), _fmt_mb(r["proj_mb"], False, r["mem"]),
            ratio, diff, r["note"]]) + " |")
    return "\n".join(lines)


def _find(rows, case, size_start=""):
    return next((r for r in rows if r["case"] == case and r["size"].startswith(size_start)), None)


def targets(rows, sizes, sgemm=None):
    """(target, measured, verdict) lines of the issues' targets, for the rows that ran; verdict "yes", or
    "no" with the shortfall."""
    out = []

    def verdict(value, goal):
        return "yes" if value >= goal else f"no, {100 * (1 - value / goal):.0f} % short"

    daa = _find(rows, "DAA loss", f"N = {sizes['daa'][1]}")
    if daa:
        speed, mem = daa["base_s"] / daa["proj_s"], daa["proj_mb"] / max(daa["base_mb"], 1e-9)
        out.append((f"DAA at N = {sizes['daa'][1]}: >= 5x faster, <= 1/4 of the memory",
                    f"{speed:.1f}x, {mem:.2f} of the memory", "yes" if speed >= 5 and mem <= 0.25 else "no"))
    for n in sizes["daa"]:
        ties = _find(rows, "DAA tie_aware vs reference", f"N = {n}")
        if ties and n != sizes["daa"][1]:  # the sizes: the smallest and the largest
            ratio = ties["proj_s"] / ties["base_s"]
            out.append((f"DAA tie_aware at N = {n}: <= 1.5x reference's time", f"{ratio:.2f}x",
                        "yes" if ratio <= 1.5 else "no"))
    small, large = (_find(rows, "PMRP", f"{n} images") for n in sizes["pmrp"])
    if small:
        speed = small["base_s"] / small["proj_s"]
        out.append((f"PMRP at {sizes['pmrp'][0]} images: >= 50x", f"{speed:.0f}x", verdict(speed, 50)))
    if large:
        out.append((f"PMRP at {sizes['pmrp'][1]} images: < 60 s and < 4 GB",
                    f"{large['proj_s']:.1f} s, {large['proj_mb'] / 1024:.2f} GB",
                    "yes" if large["proj_s"] < 60 and large["proj_mb"] < 4096 else "no"))
    process = _find(rows, "PMRP, whole process")
    if process:
        speed = process["base_s"] / process["proj_s"]
        out.append((f"pmrp_evaluation.py at {sizes['pmrp'][0]} images, whole process: >= 25x PCME's dict loop",
                    f"{speed:.1f}x", verdict(speed, 25)))
    asp = _find(rows, "ASP")
    if asp:
        speed = asp["base_s"] / asp["proj_s"]
        matrix_mb = 5 * sizes["asp"] ** 2 * 4 / 2 ** 20  # one float32 (n, 5n) input
        out.append((f"ASP of {sizes['asp']} x {5 * sizes['asp']}, both directions: < 20 s, faster than the per-row "
                    f"sort, memory under one input matrix", f"{asp['proj_s']:.1f} s, {speed:.1f}x, {asp['proj_mb']:.0f} MB",
                    "yes" if asp["proj_s"] < 20 and speed >= 1 and asp["proj_mb"] < matrix_mb else "no"))
    for r in rows:
        achieved = roofline(r, sgemm)
        if r["case"].startswith("large gallery") and not r["extrapolated"]:
            continue  # the small size: the in-memory comparison, not the target's
        if r["case"].startswith("large gallery"):
            out.append((f"{r['case']}: {r['size'].split(', dims')[0]}, every metric exact, < 20 min and < 2 GB peak",
                        f"{r['proj_s'] / 60:.1f} min, {r['proj_mb'] / 1024:.2f} GB",
                        "yes" if r["proj_s"] < 1200 and r["proj_mb"] < 2048 else "no"))
            for kind, (i2t, t2i, build, search, exact_s, dims) in r["index"].items():
                out.append((f"--shortlist_index {kind} there: recall >= 0.99 of the exact top {ANN_K}, search >= 5x "
                            f"faster than exact search", f"recall {min(i2t, t2i):.4f}, {exact_s / max(search, 1e-9):.1f}x "
                            f"(building {build:.0f} s; {dims[0]} / {dims[1]} dimensions searched)", "yes" if min(i2t, t2i) >= 0.99 and exact_s >= 5 * search else "no"))
        elif r["case"].startswith("embedding"):
            matrices_mb = 2 * 5 * sizes["emb_images"] ** 2 * 4 / 2 ** 20
            out.append((f"{r['case']}: {r['size'].split(',')[0]} scored, encoding included, with R@K, ASP and PMRP "
                        f"in < 120 s; encoding + scoring below two score matrices of memory",
                        f"{r['proj_s']:.0f} s, {r['scoring_mb']:.0f} MB",
                        "yes" if r["proj_s"] < 120 and r["scoring_mb"] < matrices_mb else "no"))
        elif r["case"].startswith("similarity") and achieved:
            ok = r["diff"] <= SIMILARITY_TOLERANCE
            out.append((f"{r['case']}: >= 75 % of the sgemm rate, outputs within {SIMILARITY_TOLERANCE:g}",
                        f"{100 * achieved[1]:.0f} %, max abs diff {r['diff']:.1e}",
                        verdict(achieved[1], 0.75) if ok else "no, outputs differ"))
        elif r["case"].startswith("training step"):
            speed = r["base_s"] / r["proj_s"]
            out.append((f"{r['case']}: >= 3x the baseline", f"{speed:.2f}x", verdict(speed, 3)))
    return out


def machine():
    """CPU model and core count (from /proc/cpuinfo), and the GPU when one is used."""
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def run_cases(args, sizes, device):
    """The rows of every case in args.cases, in CASES order; each case's time goes to stderr."""
    quality = (*args.shortlist_models, args.shortlist_data) if args.shortlist_models else None
    runners = {"similarity": lambda: bench_similarity(sizes, device, args.compile),
               "train": lambda: bench_train(sizes, device), "daa": lambda: bench_daa(sizes, device),
               "asp": lambda: bench_asp(sizes), "pmrp": lambda: bench_pmrp(sizes, args.tmp_dir),
               "tfidf": lambda: bench_tfidf(sizes), "embedding": lambda: bench_embedding(sizes, device),
               "np2h": lambda: bench_np2h(sizes, args.tmp_dir), "shortlist": lambda: bench_shortlist(sizes, device, quality),
               "large_gallery": lambda: bench_large_gallery(sizes, device, args.large_images, sgemm_rate(device))}
    rows = []
    for case in CASES + EXTRA_CASES:
        if case in args.cases:
            start = time.perf_counter()
            rows += runners[case]()
            print(f"[bench] {case}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def sgemm_before_after(run, device):
    """run() between two sgemm_rate measurements: (its result, (rate before, rate after))."""
    before = sgemm_rate(device)
    result = run()
    return result, (before, sgemm_rate(device))


def main(argv=None):
    parser = errors.ArgumentParser(description="Time the project against plain baselines of the original "
                                               "algorithms and print a Markdown table.")
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch cases; numpy cases run on the CPU)")
    parser.add_argument("--compile", action="store_true", help="add similarity rows under torch.compile")
    parser.add_argument("--cases", nargs="+", choices=CASES + EXTRA_CASES, default=list(CASES),
                        help=f"cases to run ({', '.join(EXTRA_CASES)} only when named)")
    parser.add_argument("--large_images", type=int, default=LARGE_GALLERY_IMAGES,
                        help="large_gallery: images of the large size (5 captions each); a fifth of it is the small "
                             "size, where the in-memory path is measured too")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--tmp_dir", default=None, help="folder for the np2h and PMRP files (default: the system's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and of numpy's BLAS (default: one per core, 1 with --quick); "
                             "1 gives steadier figures on a machine shared with other jobs")
    parser.add_argument("--shortlist_models", nargs=3, metavar=("SGR", "SAF", "SHORTLIST"),
                        help="shortlist case: checkpoints for quality rows (plain SGRAF vs two-stage retrieval)")
    parser.add_argument("--shortlist_data", default=None, help="with --shortlist_models: their data path (testall)")
    args = parser.parse_args(argv)
    if bool(args.shortlist_models) != bool(args.shortlist_data):
        raise InputError("--shortlist_models and --shortlist_data go together (the quality rows of the shortlist case)")
    if args.large_images < 25:
        raise InputError(f"--large_images must be at least 25 (a fifth of it is the small size), got {args.large_images}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if not os.path.exists("/proc/self/clear_refs"):
        raise InputError("bench.py measures peak memory through /proc/self/clear_refs: it needs Linux")
    device = evaluation.resolve_device(args.device)
    global MAX_RUNS
    MAX_RUNS = bench_common.MAX_RUNS = 1 if args.quick else 3  # bench_common's: what measure() reads
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if device.type == "cuda" and not args.quick:
        sizes.update(CUDA_SIZES)
    command = "python -m tools.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    threads = torch.get_num_threads()
    limit = args.threads or (1 if args.quick else None)  # tiny ops of a smoke run gain nothing from threads
    gc.freeze()  # what exists now (modules, ...) is not garbage: keeps each measurement's gc.collect() short
    try:
        with threadpoolctl.threadpool_limits(limit):  # None: no limit
            torch.set_num_threads(limit or threads)
            rows, sgemm = sgemm_before_after(lambda: run_cases(args, sizes, device), device)
            header = machine()
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    report = [f"Date {datetime.date.today().isoformat()}; machine: {header}; device {device.type}; "
              f"command `{command.strip()}`; total {time.perf_counter() - started:.0f} s.", "",
              f"sgemm rate (fp32 torch.mm {SGEMM_SIZE} x {SGEMM_SIZE}, {limit or threads} thread(s), {device.type}): "
              f"{sgemm[0]:.1f} GFLOP/s before the cases, {sgemm[1]:.1f} after; the roofline column's 100 % is the "
              f"larger.", "",
              format_table(rows, max(sgemm)), "",
              "Peak memory: peak RSS increase in this process (kernel high-water mark reset before each run, "
              "/proc/self/clear_refs), GPU = torch.cuda.max_memory_allocated increase. Time: "
              + (f"best of up to {MAX_RUNS} runs (runs over {REPEAT_UNDER_S:g} s and training steps once)"
                 if MAX_RUNS > 1 else "one run per case") + ". ≈ = extrapolated, see the note.", ""]
    lines = targets(rows, sizes, max(sgemm))
    if lines:
        report += ["| target | measured | met |", "|---|---|---|"]
        report += [f"| {t} | {m} | {ok} |" for t, m, ok in lines]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        fileio.write_text(text, args.out)
    return rows


if __name__ == "__main__":
    sys.exit(errors.run(main))
