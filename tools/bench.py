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
import argparse
import copy
import datetime
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import h5py
import numpy as np
import threadpoolctl
import torch
import torch.nn as nn

import ann_index
import errors
import evaluation
import fileio
import np2h
import scoring
from tools.baselines.asp_sort import asp_sort
from tools.baselines.daa_direct import daa_loss_direct
from tools.baselines.pmrp_dict import pmrp_dict
from tools.baselines.sim_loop import sim_one_caption_at_a_time
from tools.baselines.tfidf_dense import relevance_dense
from daa_loss import DAALoss, SemanticRelevance, contrastive_loss
from errors import InputError
from layout import REGIONS
from model import SimilarityModel
from pmrp_com.pmrp import StreamedPMRP, pmrp_scores, topk_rows

CASES = ("similarity", "train", "daa", "asp", "pmrp", "tfidf", "embedding", "np2h", "shortlist")
EXTRA_CASES = ("large_gallery",)  # run only when named in --cases (the full size runs for many minutes)
LARGE_GALLERY_IMAGES = 25000  # 5x COCO 5K each way: 25,000 images x 125,000 captions
ANN_K = 100  # the large_gallery case's ANN rows: recall of each query's exact top 100
ANN_EFFORTS = {"hnsw": (100, 256, 512), "ivf": (4, 16, 64)}  # their trade-off curves: efSearch, cells probed
REPEAT_UNDER_S = 1.0  # runs shorter than this are repeated (best of MAX_RUNS)
MAX_RUNS = 3  # 1 with --quick, a smoke run
COCO_TRAIN_IMAGES = 113287  # (113,287, 36, 2048) float32 = 31.1 GB (MB and GB here are 2^20 and 2^30 bytes)
# Sizes per mode. Full: the sizes; quick: the same code paths in about a minute.
SIZES = {
    "full": dict(dims=(2048, 300, 1024, 256), vocab=10000, sim_images=100, sim_captions=300, shard=100,
                 batch=128, daa=(128, 256, 512), asp=5000, pmrp=(1000, 5000), pmrp_subsets=(1000, 2000),
                 tfidf=566435, tfidf_subsets=(10000, 20000), np2h_images=2000, emb_images=5000, emb_sgr=(10, 50),
                 shortlist_scale=(5000, 25000), shortlist_k=(10, 50, 100), shortlist_block=(20, 100), shortlist_images=4),
    "quick": dict(dims=(128, 32, 64, 32), vocab=500, sim_images=12, sim_captions=30, shard=10,
                  batch=12, daa=(16, 32, 64), asp=100, pmrp=(50, 200), pmrp_subsets=(50, 100),
                  tfidf=5000, tfidf_subsets=(500, 1000), np2h_images=40, emb_images=60, emb_sgr=(5, 20),
                  shortlist_scale=(200, 1000), shortlist_k=(10, 50, 100), shortlist_block=(12, 30), shortlist_images=3),
}
# On a GPU the baselines are cheap enough to score more pairs (the project needs them to fill the device).
CUDA_SIZES = dict(sim_images=500, sim_captions=1000)
TOLERANCE = 1e-5  # max abs difference allowed between project and baseline outputs
SIMILARITY_TOLERANCE = 1e-6  # the scoring target's: the same outputs as the caption loop to this
SGEMM_SIZE = 1024  # the square product whose fp32 rate is the roofline column's 100 %


# ------------------------------------------------------------------------------------------------
# Measurement


def _status_mb(field):
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak():
    """Hand freed memory back, reset the peak-RSS mark; returns the RSS (MB) the peak is counted from."""
    gc.collect()
    evaluation.release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_mem(device):
    """What a torch case's memory column measures on `device`."""
    return "GPU" if device.type == "cuda" else "RSS"


def measure(fn, device, once=False):
    """Best time (s) of up to MAX_RUNS runs of fn() (repeated only when under REPEAT_UNDER_S, never when
    `once`), its peak memory increase (MB, the largest over the runs) and the last run's result."""
    times, peaks = [], []
    while not times or (not once and len(times) < MAX_RUNS and times[0] < REPEAT_UNDER_S):
        result = None  # the previous run's output is not kept alive through this one
        start_rss = _reset_peak()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start_gpu = torch.cuda.memory_allocated(device)
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device) - start_gpu) / 2 ** 20)
        else:
            peaks.append(_status_mb("VmHWM") - start_rss)
    return min(times), max(peaks), result


def sgemm_rate(device, runs=5):
    """GFLOP/s of a square fp32 torch.mm of SGEMM_SIZE on `device` at the current thread count, best of
    `runs` (after one warm-up product)."""
    a, b = (torch.rand(SGEMM_SIZE, SGEMM_SIZE, generator=torch.Generator().manual_seed(k)).to(device) for k in (0, 1))
    a @ b
    best = float("inf")
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * SGEMM_SIZE ** 3 / best / 1e9


def similarity_flops(n_images, lengths, dims, module_name, sgr_step=3):
    """Flops of the matrix products that score n_images x len(lengths) pairs, the self-attention globals
    of every image and caption included (module docstring)."""
    _, _, d, s = dims
    R = REGIONS
    L = torch.as_tensor(lengths, dtype=torch.float64)
    N = L + 1
    per_pair = 2 * R * L * d + 2 * L * R * d + 2 * L * d * s + 2 * d * s + 2 * s
    if module_name == "SGR":
        full_step = 2 * N * s * (s + 1) + 4 * N ** 2 * s + 2 * N * s ** 2
        per_pair = per_pair + (sgr_step - 1) * full_step + 2 * s * (s + 1) + 4 * N * s + 2 * s ** 2
    else:
        per_pair = per_pair + 4 * N * s
    flops = n_images * float(per_pair.sum())
    flops += n_images * (2 * R * d * d + 2 * d * d + 4 * R * d) + float((2 * L * d * d + 2 * d * d + 4 * L * d).sum())
    if module_name == "SGR":
        flops += sgr_step * (2 * s ** 3 + 4 * s ** 2 + 2 * s)
    return flops


def train_step_flops(batch, lengths, dims, module_name, sgr_step=3, bi_gru=True):
    """Flops of the matrix products of one training step on `batch` images and captions (module docstring)."""
    img_dim, word_dim, d, _ = dims
    image_fc = batch * 2 * REGIONS * img_dim * d
    gru = float(torch.as_tensor(lengths, dtype=torch.float64).sum()) * (2 if bi_gru else 1) * 2 * 3 * (word_dim * d + d * d)
    forward = image_fc + gru + similarity_flops(batch, lengths, dims, module_name, sgr_step)
    return 3 * forward - image_fc


def extrapolate(sizes, values, target):
    """Power law v = a n^p through (sizes[0], values[0]) and (sizes[1], values[1]), at n = target: (v, p)."""
    p = np.log(values[1] / values[0]) / np.log(sizes[1] / sizes[0])
    return values[1] * (target / sizes[1]) ** p, p


def max_abs_diff(pairs):
    """Largest |a - b| over (a, b) pairs of tensors / arrays / numbers, in float64."""
    def as64(x):
        return torch.as_tensor(x).detach().to("cpu", torch.float64)
    return max(float((as64(a) - as64(b)).abs().max()) for a, b in pairs)


def row(case, size, base, proj, diff=None, pairs=None, note="", extrapolated=False, proj_extrapolated=False,
        mem="RSS", flops=None, **extra):
    """One table row; base / proj are (seconds, peak MB) of the baseline and the project; `extrapolated`
    marks the baseline's figures as estimates, `proj_extrapolated` the project's time; `flops`: the
    project's matrix-product flops, for the roofline column; `extra`: case-specific figures for the targets."""
    return dict(case=case, size=size, base_s=base[0], base_mb=base[1], proj_s=proj[0], proj_mb=proj[1],
                diff=diff, pairs=pairs, note=note, extrapolated=extrapolated, proj_extrapolated=proj_extrapolated,
                mem=mem, flops=flops, **extra)


# ------------------------------------------------------------------------------------------------
# Inputs


def model_options(dims, vocab, module_name):
    """Training options of a SimilarityModel; dims = (img_dim, word_dim, embed_size, sim_dim)."""
    img_dim, word_dim, embed_size, sim_dim = dims
    return argparse.Namespace(img_dim=img_dim, word_dim=word_dim, embed_size=embed_size, sim_dim=sim_dim,
                              num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False,
                              module_name=module_name, sgr_step=3, vocab_size=vocab)


def build_model(sizes, module_name, device, seed=0):
    """A SimilarityModel with dropout off (p = 0): the caption loop draws its dropout masks in another
    order, so only without dropout do the two sides compute the same function."""
    torch.manual_seed(seed)
    model = SimilarityModel(model_options(sizes["dims"], sizes["vocab"], module_name))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.to(device)


def random_inputs(n_images, n_captions, sizes, device, seed=0):
    """Region features (n_images, 36, img_dim) in [0, 1), word ids (n_captions, 20) and lengths 8..20."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 36, sizes["dims"][0], generator=gen)
    lengths = torch.randint(8, 21, (n_captions,), generator=gen)
    captions = torch.randint(4, sizes["vocab"], (n_captions, 20), generator=gen)
    captions[torch.arange(20) >= lengths[:, None]] = 0
    return images.to(device), captions.to(device), lengths


def synthetic_captions(n, seed=0, vocabulary=30000):
    """n captions of 8-16 words drawn from a Zipf(1.1) law over `vocabulary` words (COCO train has ~27k
    distinct words): realistic sparsity for TF-IDF, where the dense matrix grows with n x vocabulary."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{k}" for k in range(vocabulary)])
    p = 1.0 / np.arange(1, vocabulary + 1) ** 1.1
    lengths = rng.integers(8, 17, size=n)
    ids = rng.choice(vocabulary, size=int(lengths.sum()), p=p / p.sum())
    ends = np.cumsum(lengths)
    return [" ".join(words[ids[end - length:end]]) for end, length in zip(ends, lengths)]


def random_codes(n, seed=0):
    """(n, 90) uint8 multi-hot COCO category codes: 1-6 of the 80 used ids, Zipf-like frequencies, 1 image
    in 100 without instances (as in COCO)."""
    rng = np.random.default_rng(seed)
    used = rng.choice(90, size=80, replace=False)
    p = 1.0 / np.arange(1, 81) ** 0.9
    codes = np.zeros((n, 90), dtype=np.uint8)
    for i in range(n):
        if rng.random() >= 0.01:
            codes[i, rng.choice(used, size=int(rng.integers(1, 7)), replace=False, p=p / p.sum())] = 1
    return codes


# ------------------------------------------------------------------------------------------------
# Cases


def bench_similarity(sizes, device, compile_chunks):
    """Eval-mode scores of n_images x n_captions pairs, SGR and SAF, pairs per second."""
    n_i, n_c, shard = sizes["sim_images"], sizes["sim_captions"], sizes["shard"]
    images, captions, lengths = random_inputs(n_i, n_c, sizes, device)
    rows = []
    for module_name in ("SGR", "SAF"):
        model = build_model(sizes, module_name, device).eval()
        with torch.no_grad():
            img_embs, cap_embs = model.encode_images(images), model.encode_captions(captions, lengths)

            def baseline():  # the original's evaluation: 100 x 100 shards, one caption at a time in each
                out = torch.empty(n_i, n_c, device=device)
                for a in range(0, n_i, shard):
                    for c in range(0, n_c, shard):
                        out[a:a + shard, c:c + shard] = sim_one_caption_at_a_time(
                            model.sim_enc, img_embs[a:a + shard], cap_embs[c:c + shard], lengths[c:c + shard])
                return out

            def project(m=model):
                return evaluation.similarity_block(m, img_embs.cpu(), [(0, cap_embs.cpu(), lengths)], (0, n_i),
                                                   (0, n_c), 1000, device)

            sim_one_caption_at_a_time(model.sim_enc, img_embs[:4], cap_embs[:4], lengths[:4])  # warm-up
            model.similarity(img_embs[:4], cap_embs[:4], lengths[:4])
            base = measure(baseline, device)
            proj = measure(project, device)
            size = f"{n_i} images x {n_c} captions, dims {'/'.join(map(str, sizes['dims']))}"
            flops = similarity_flops(n_i, lengths, sizes["dims"], module_name)
            rows.append(row(f"similarity {module_name}", size, base[:2], proj[:2],
                            max_abs_diff([(proj[2], base[2])]), pairs=n_i * n_c, mem=_torch_mem(device), flops=flops))
            if compile_chunks:
                compiled = copy.deepcopy(model)
                compiled.sim_enc._nodes = torch.compile(compiled.sim_enc._nodes, dynamic=True)
                start = time.perf_counter()
                project(compiled)  # compiles, for every chunk shape this input needs
                compile_s = time.perf_counter() - start
                comp = measure(lambda: project(compiled), device)
                rows.append(row(f"similarity {module_name}, torch.compile", size, base[:2], comp[:2],
                                max_abs_diff([(comp[2], base[2])]), pairs=n_i * n_c, mem=_torch_mem(device),
                                flops=flops, note=f"first call (compiling) {compile_s:.0f} s"))
    return rows


def train_step(model, optimizer, images, captions, lengths, relevance, scores_and_loss):
    """Forward, loss, backward, clip (2.0, as train.py), Adam step: returns the scores, the loss and a copy
    of the gradients (for the comparison; the new weights would not do: Adam's first step moves every
    weight by about lr whatever the size of its gradient, so rounding noise on a ~0 gradient shows)."""
    sims, loss = scores_and_loss(model, images, captions, lengths, relevance)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sims.detach(), loss.detach(), grads


def project_loss(model, images, captions, lengths, relevance):
    """The project's forward: all pairs at once; VSE++ + blockwise DAA (what train.py computes)."""
    sims = model(images, captions, lengths)
    return sims, DAALoss(daa_weight=25)(sims, relevance)["loss"]


def baseline_loss(model, images, captions, lengths, relevance):
    """The original's forward: encoders, then the similarity one caption at a time; VSE++ + direct DAA."""
    sims = sim_one_caption_at_a_time(model.sim_enc, model.encode_images(images),
                                     model.encode_captions(captions, lengths), lengths)
    return sims, contrastive_loss(sims) + daa_loss_direct(sims, relevance, 25.0, variant="reference")


def bench_train(sizes, device):
    """One step at the training batch size, SGR and SAF, from identical weights and a fresh Adam."""
    n = sizes["batch"]
    images, captions, lengths = random_inputs(n, n, sizes, device, seed=1)
    relevance = torch.from_numpy(SemanticRelevance(synthetic_captions(5 * n, seed=1)).block(
        np.arange(n), 5 * np.arange(n))).to(device)  # each image's first caption, as a batch
    warm = random_inputs(4, 4, sizes, device, seed=2) + (relevance[:4, :4],)
    rows = []
    for module_name in ("SGR", "SAF"):
        results = {}
        for side, loss_fn in (("baseline", baseline_loss), ("project", project_loss)):
            scratch = build_model(sizes, module_name, device).train()  # warm-up on a throw-away copy
            train_step(scratch, torch.optim.Adam(scratch.parameters(), lr=2e-4), *warm, loss_fn)
            del scratch
            model = build_model(sizes, module_name, device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
            results[side] = measure(lambda: train_step(model, optimizer, images, captions, lengths, relevance,
                                                       loss_fn), device, once=True)
        (sims_p, loss_p, grads_p), (sims_b, loss_b, grads_b) = results["project"][2], results["baseline"][2]
        grad_diff = max_abs_diff(zip(grads_p, grads_b)) / max(float(g.abs().max()) for g in grads_b)
        loss_diff = abs(float(loss_p) - float(loss_b)) / abs(float(loss_b))
        rows.append(row(f"training step {module_name}", f"batch {n}, dims {'/'.join(map(str, sizes['dims']))}",
                        results["baseline"][:2], results["project"][:2], max_abs_diff([(sims_p, sims_b)]),
                        mem=_torch_mem(device), flops=train_step_flops(n, lengths, sizes["dims"], module_name),
                        note=f"forward + VSE++ + DAA + backward + clip + Adam, one step; diff over the scores; the "
                             f"loss ({float(loss_b):.1f}) within {loss_diff:.0e} relative, the largest gradient "
                             f"difference {grad_diff:.0e} of the largest gradient"))
    return rows


def bench_daa(sizes, device):
    """DAA loss (both directions) forward + backward at each N."""
    rows = []
    warm = torch.rand(8, 8, device=device, requires_grad=True)
    daa_loss_direct(warm, warm.detach(), 25.0, variant="reference").backward()
    DAALoss(daa_weight=25)(warm, warm.detach())["loss"].backward()
    for n in sizes["daa"]:
        gen = torch.Generator().manual_seed(n)
        S, M = torch.rand(n, n, generator=gen).to(device), torch.rand(n, n, generator=gen).to(device)
        criterion = DAALoss(daa_weight=25)

        def run(loss_fn):
            leaf = S.clone().requires_grad_()
            loss = loss_fn(leaf)
            loss.backward()
            return loss.detach(), leaf.grad

        def project(s):
            out = criterion(s, M)
            return out["daa_i2t_loss"] + out["daa_t2i_loss"]

        base = measure(lambda: run(lambda s: daa_loss_direct(s, M, 25.0, variant="reference")), device)
        proj = measure(lambda: run(project), device)
        rows.append(row("DAA loss", f"N = {n}", base[:2], proj[:2],
                        max_abs_diff([(proj[2][0], base[2][0]), (proj[2][1], base[2][1])]), mem=_torch_mem(device),
                        note="forward + backward, both directions; diff over loss and gradient"))
        tie_aware = DAALoss(daa_weight=25, daa_variant="tie_aware")
        ties = measure(lambda: run(lambda s: sum(tie_aware.daa_terms(s, M))), device)
        rows.append(row("DAA tie_aware vs reference", f"N = {n}", proj[:2], ties[:2], mem=_torch_mem(device),
                        note="both blockwise; 'baseline' = the reference variant (another objective: no diff)"))
    return rows


def bench_asp(sizes):
    """Exact ASP of an (n, 5n) matrix, i2t and t2i."""
    n = sizes["asp"]
    rng = np.random.default_rng(3)
    S = rng.random((n, 5 * n), dtype=np.float32)
    M = rng.random((n, 5 * n), dtype=np.float32)
    base = measure(lambda: (asp_sort(S, M), asp_sort(S.T, M.T)), torch.device("cpu"))
    proj = measure(lambda: (evaluation.asp(S, M), evaluation.asp(S.T, M.T)), torch.device("cpu"))
    note = f"both directions; continuous values (no ties); the inputs themselves are {2 * S.nbytes / 2 ** 20:.0f} MB"
    return [row("ASP", f"{n} x {5 * n}", base[:2], proj[:2], max_abs_diff(zip(proj[2], base[2])), note=note)]


def _pmrp_diff(proj, base):
    """Largest difference between two PMRP results (every number of both directions)."""
    return max([abs(proj[d][k] - base[d][k]) for d in ("i2t", "t2i") for k in ("pmrp", "pmr1")] +
               [abs(proj[d]["pmrp_thres"][t] - base[d]["pmrp_thres"][t]) for d in ("i2t", "t2i")
                for t in proj[d]["pmrp_thres"]])


def _pmrp_pair(n, codes_all):
    """Baseline and project PMRP (n_fold 0) of the first n images of a random matrix: (base, proj, diff)."""
    rng = np.random.default_rng(n)
    sims = rng.random((n, 5 * n), dtype=np.float32)
    codes = codes_all[:n]
    image_ids = np.arange(n, dtype=np.int64) * 7 + 1
    iid_to_code = {int(i): list(map(int, c)) for i, c in zip(image_ids, codes)}
    base = measure(lambda: pmrp_dict(sims, image_ids, iid_to_code, n_fold=0), torch.device("cpu"))
    proj = measure(lambda: pmrp_scores(sims, codes, n_fold=0), torch.device("cpu"))
    return base, proj, _pmrp_diff(proj[2], base[2])


# The baseline's whole process: the files read as pmrp_evaluation.py reads them, then PCME's dict loop;
# argv: matrix, ids file, instances file, result JSON.
PMRP_DICT_PROCESS = """
import json, sys
import numpy as np
from pmrp_com.pmrp import instance_codes, read_image_ids
from tools.baselines.pmrp_dict import pmrp_dict
sims = np.load(sys.argv[1])
ids = read_image_ids(sys.argv[2], sims.shape[0])
codes = instance_codes(sys.argv[3], ids)
result = pmrp_dict(sims, ids, {int(i): list(map(int, c)) for i, c in zip(ids, codes)}, n_fold=0)
with open(sys.argv[4], "w") as f:
    json.dump(result, f)
"""


def write_coco_split(directory, sims, codes):
    """pmrp_evaluation.py's inputs in `directory`: S.npy, testall_ids.txt (ids 7i + 1) and
    ann/instances_val2014.json with one COCO-style instance annotation per category of each image's code."""
    image_ids = np.arange(len(codes), dtype=np.int64) * 7 + 1
    np.save(os.path.join(directory, "S.npy"), sims)
    fileio.write_text("".join(f"{i}\n" for i in np.repeat(image_ids, 5)), os.path.join(directory, "testall_ids.txt"))
    annotations = [{"id": k, "image_id": int(image_id), "category_id": int(category) + 1, "iscrowd": 0,
                    "area": 100.0, "bbox": [0.0, 0.0, 10.0, 10.0]}
                   for k, (image_id, category) in enumerate(zip(image_ids[np.nonzero(codes)[0]], np.nonzero(codes)[1]))]
    fileio.write_json({"images": [{"id": int(i), "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in image_ids],
                       "annotations": annotations,
                       "categories": [{"id": c, "name": f"category {c}"} for c in range(1, 91)]},
                      os.path.join(directory, "ann", "instances_val2014.json"))


def measure_process(argv, log_path):
    """Best wall time (s) of up to MAX_RUNS runs of the process `argv` (repeated only when under
    REPEAT_UNDER_S) in the repository root, with this process's thread count, and its peak RSS (MB): its
    VmHWM, read every 2 ms while it runs (the kernel's child rusage would count this process's memory,
    which the child holds until its exec). Its output goes to log_path; a failure raises RuntimeError."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    times, peaks = [], []
    while not times or (len(times) < MAX_RUNS and times[0] < REPEAT_UNDER_S):
        peak = 0.0
        with open(log_path, "w") as log:
            start = time.perf_counter()
            child = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            while child.poll() is None:
                try:
                    with open(f"/proc/{child.pid}/status") as status:
                        peak = max([peak] + [int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")])
                except OSError:  # it has just ended
                    pass
                time.sleep(0.002)
            times.append(time.perf_counter() - start)
        if child.returncode:
            with open(log_path) as log:
                raise RuntimeError(f"{' '.join(argv[:3])} failed ({child.returncode}): {log.read()[-2000:]}")
        peaks.append(peak)
    return min(times), max(peaks)


def bench_pmrp_process(n, codes, tmp_dir):
    """pmrp_evaluation.py on n images vs the dict loop's process, both from start-up to result."""
    directory = tempfile.mkdtemp(prefix="bench_pmrp_", dir=tmp_dir)
    try:
        write_coco_split(directory, np.random.default_rng(n).random((n, 5 * n), dtype=np.float32), codes[:n])
        paths = [os.path.join(directory, name) for name in ("S.npy", "testall_ids.txt", "ann")]
        base_json, proj_json = os.path.join(directory, "base.json"), os.path.join(directory, "proj.json")
        log = os.path.join(directory, "log.txt")
        base = measure_process([sys.executable, "-c", PMRP_DICT_PROCESS, paths[0], paths[1],
                                os.path.join(paths[2], "instances_val2014.json"), base_json], log)
        proj = measure_process([sys.executable, "pmrp_evaluation.py", "--path1", paths[0], "--n_fold", "0",
                                "--dataset_root", directory, "--ann_root", paths[2], "--json", proj_json], log)
        diff = _pmrp_diff(fileio.read_json(proj_json, "result"), fileio.read_json(base_json, "result"))
    finally:
        shutil.rmtree(directory)
    return row("PMRP, whole process", f"{n} images x {5 * n} captions", base, proj, diff,
               note="`python pmrp_evaluation.py --n_fold 0 --json` vs a process reading the same files and "
                    "running pmrp_dict: start-up, imports, matrix, ids, instances (pycocotools) included; "
                    "memory = the process's peak RSS")


def bench_pmrp(sizes, tmp_dir):
    """PMRP at the measured size, and at the large size with the baseline extrapolated from two subsets;
    then the whole process at the measured size."""
    small, large = sizes["pmrp"]
    subsets = sizes["pmrp_subsets"]
    codes_all = random_codes(max(large, *subsets))
    measured = {n: _pmrp_pair(n, codes_all) for n in sorted({small, *subsets})}
    base, proj, diff = measured[small]
    rows = [row("PMRP", f"{small} images x {5 * small} captions", base[:2], proj[:2], diff,
                note="n_fold 0, thresholds 0-2; annotation reading excluded")]
    rng = np.random.default_rng(large)
    sims = rng.random((large, 5 * large), dtype=np.float32)
    proj_large = measure(lambda: pmrp_scores(sims, codes_all[:large], n_fold=0), torch.device("cpu"))
    base_s, p_s = extrapolate(subsets, [measured[n][0][0] for n in subsets], large)
    base_mb, p_mb = extrapolate(subsets, [measured[n][0][1] for n in subsets], large)
    rows.append(row("PMRP", f"{large} images x {5 * large} captions", (base_s, base_mb), proj_large[:2],
                    measured[subsets[1]][2], extrapolated=True,
                    note=f"baseline extrapolated as n^p from {subsets[0]} and {subsets[1]} images (time p = "
                         f"{p_s:.2f}, memory p = {p_mb:.2f}); diff at {subsets[1]} images"))
    rows.append(bench_pmrp_process(small, codes_all, tmp_dir))
    return rows


class RandomBatches:
    """An evaluation loader of random inputs, made batch by batch (COCO 5K's features alone are 1.4 GB):
    images yield (features (b, 36, img_dim), ids), captions (word ids (b, L_b), lengths (b,), ids) with
    COCO-like lengths, 6 + Poisson(5.5) words (mean 11.5, as SCAN's tokenised COCO captions)."""

    def __init__(self, n, sizes, captions, batch_size=128, seed=0):
        self.n, self.sizes, self.captions, self.batch_size, self.seed = n, sizes, captions, batch_size, seed

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch_size):
            b = min(self.batch_size, self.n - start)
            ids = torch.arange(start, start + b)
            if not self.captions:
                yield torch.rand(b, 36, self.sizes["dims"][0], generator=gen), ids
                continue
            lengths = 6 + torch.poisson(torch.full((b,), 5.5), generator=gen).long()
            words = torch.randint(4, self.sizes["vocab"], (b, int(lengths.max())), generator=gen)
            yield words.masked_fill(torch.arange(words.shape[1]) >= lengths[:, None], 0), lengths, ids


def encoder_flops(sizes, n_images, caption_words):
    """Multiply-adds x 2 of the image fc (every region) and the bi-GRU (every word, both directions:
    3 gates x (input + hidden) matrix products)."""
    img_dim, word_dim, embed_size, _ = sizes["dims"]
    return 2 * n_images * 36 * img_dim * embed_size + 2 * 2 * caption_words * 3 * embed_size * (word_dim + embed_size)


def bench_embedding(sizes, device):
    """COCO-5K-sized evaluation of VSE and PCME end to end, against SGR's pairs/s extrapolated."""
    n_i = sizes["emb_images"]
    n_c = 5 * n_i
    images, captions = RandomBatches(n_i, sizes, False, seed=1), RandomBatches(n_c, sizes, True, seed=2)
    caption_words = sum(int(batch[1].sum()) for batch in captions)
    rng = np.random.default_rng(4)
    relevance = rng.random((n_i, n_c), dtype=np.float32)
    codes = random_codes(n_i)
    # SGR on a subset, encoders excluded (generous to SGR), as evaluation.similarity_block scores it
    sgr = build_model(sizes, "SGR", device).eval()
    sub_i, sub_c = sizes["emb_sgr"]
    sub_images, sub_captions, sub_lengths = random_inputs(sub_i, sub_c, sizes, device, seed=5)
    with torch.no_grad():
        img_embs, cap_embs = sgr.encode_images(sub_images), sgr.encode_captions(sub_captions, sub_lengths)
        sgr.similarity(img_embs[:2], cap_embs[:4], sub_lengths[:4])  # warm-up
        sgr_s, sgr_mb, _ = measure(lambda: sgr.similarity(img_embs, cap_embs, sub_lengths), device)
    del sgr
    sgr_pairs_per_s = sub_i * sub_c / sgr_s
    rows = []
    for module_name in ("VSE", "PCME"):
        torch.manual_seed(0)
        model = SimilarityModel(argparse.Namespace(**vars(model_options(sizes["dims"], sizes["vocab"], module_name)),
                                                   vse_pool="mean", pcme_samples=7)).to(device).eval()
        encode_s, scoring_mb = [], []
        real_encode = scoring.encode

        def timed_encode(*args):
            start = time.perf_counter()
            out = real_encode(*args)
            encode_s.append(time.perf_counter() - start)
            return out

        def project():
            start_mb = _status_mb("VmRSS")  # measure() has just reset the peak mark
            with mock.patch.object(scoring, "encode", timed_encode):
                sims = evaluation.compute_sims(model, images, captions, device=device)
            scoring_mb.append(_status_mb("VmHWM") - start_mb)  # the peak of encoding + the matrix
            return evaluation.score_matrix(sims, relevance), pmrp_scores(sims, codes, n_fold=0)

        total_s, peak_mb, (metrics, _) = measure(project, device, once=True)
        gflops = encoder_flops(sizes, n_i, caption_words) / encode_s[-1] / 1e9
        score_gflop = 2 * n_i * n_c * sizes["dims"][2] / 1e9
        rows.append(row(f"embedding {module_name}", f"{n_i} images x {n_c} captions, dims "
                        f"{'/'.join(map(str, sizes['dims'][:3]))}", (n_i * n_c / sgr_pairs_per_s, sgr_mb),
                        (total_s, peak_mb), extrapolated=True, mem=_torch_mem(device), scoring_mb=scoring_mb[-1],
                        note=f"encode {encode_s[-1]:.1f} s ({gflops:.0f} GFLOP/s achieved by the encoders, "
                             f"{caption_words:,} words), then scoring ({score_gflop:.0f} GFLOP of matrix "
                             f"product) + R@K + ASP + PMRP {total_s - encode_s[-1]:.1f} s; peak of encoding + "
                             f"matrix {scoring_mb[-1]:,.0f} MB, one (n_i, n_c) float32 matrix being "
                             f"{n_i * n_c * 4 / 2 ** 20:,.0f} MB (the project peak adds ASP's and PMRP's "
                             f"buffers). Baseline: SGR at "
                             f"{sgr_pairs_per_s:,.0f} pairs/s ({sub_i} x {sub_c} pairs, encoders excluded, its "
                             f"peak memory there) extrapolated to {n_i * n_c:,} pairs"
                             + ("; PCME scored by its means" if module_name == "PCME" else "")))
    return rows


class _Timed:
    """`target` with its method `name` timed into timers[key] (seconds, summed over calls)."""

    def __init__(self, target, name, timers, key):
        self.target, self.name, self.timers, self.key = target, name, timers, key

    def __getattr__(self, attr):
        method = getattr(self.target, attr)
        if attr != self.name:
            return method

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.timers[self.key] += time.perf_counter() - start
            return out
        return timed


def ann_rows(n_i, n_c, dim):
    """--shortlist_index at n_i images x n_c captions: ({kind: (i2t recall, t2i recall, build seconds, search
    seconds, exact seconds)} for hnsw and ivf at ann_index's defaults, {kind: [(effort, i2t recall, t2i recall,
    search seconds)]} at the ANN_EFFORTS of each kind, the same indexes searched again): the recall of each
    query's exact top ANN_K, the indexes' building and searching, and exact search (products of chunks of
    queries and their top K), both directions. The vectors are standin_embeddings, as VSE's unit vectors are
    searched."""
    images, captions = (t.numpy() for t in standin_embeddings(n_i, n_c, dim))
    directions = dict(zip(("i2t", "t2i"), ann_index.search_vectors("VSE", images, captions)))
    threads = torch.get_num_threads()
    exact, exact_s = {}, 0.0
    for direction, (queries, gallery) in directions.items():
        start = time.perf_counter()
        step = max(1, scoring.STREAM_CHUNK_BYTES // (4 * len(gallery)))
        exact[direction] = np.concatenate([topk_rows(queries[a:a + step] @ gallery.T, ANN_K)
                                           for a in range(0, len(queries), step)])
        exact_s += time.perf_counter() - start
    out, curve = {}, {}
    for kind in ("hnsw", "ivf"):
        build_s, indexes = 0.0, {}
        for direction, (queries, gallery) in directions.items():
            start = time.perf_counter()
            indexes[direction] = ann_index.build(kind, gallery, threads)
            build_s += time.perf_counter() - start
        curve[kind] = []
        for effort in (None,) + ANN_EFFORTS[kind]:
            recalls, search_s = [], 0.0
            for direction, (queries, _) in directions.items():
                start = time.perf_counter()
                ids = ann_index.search(indexes[direction], queries, ANN_K, effort)
                search_s += time.perf_counter() - start
                recalls.append(ann_index.recall(ids, exact[direction]))
            if effort is None:
                out[kind] = (*recalls, build_s, search_s, exact_s)
            else:
                curve[kind].append((effort, *recalls, search_s))
    return out, curve


def large_gallery_run(sizes, device, n_i, shard_size, in_memory=False):
    """VSE on n_i random images x 5 n_i captions (full dims, random weights), every item encoded once, then
    R@K, medr, meanr and ASP against the captions' sparse TF-IDF relevance and PMRP (random category codes,
    whole split), streamed (scoring.score_streamed, PMRP from the same chunks: StreamedPMRP) or, with
    in_memory, as evaluation.py without --stream (the whole matrix and the dense relevance) and
    pmrp_scores. Returns (seconds, peak MB, report, timers: encoding / products / relevance rows / ranking /
    PMRP seconds, encoder GFLOP)."""
    n_c = 5 * n_i
    images, captions = RandomBatches(n_i, sizes, False, seed=1), RandomBatches(n_c, sizes, True, seed=2)
    caption_words = sum(int(batch[1].sum()) for batch in captions)
    relevance = SemanticRelevance(synthetic_captions(n_c, seed=3))  # set up beforehand: the TF-IDF fit is not timed
    torch.manual_seed(0)
    model = SimilarityModel(argparse.Namespace(**vars(model_options(sizes["dims"], sizes["vocab"], "VSE")),
                                               vse_pool="mean", pcme_samples=7)).to(device).eval()
    codes = random_codes(n_i)
    timers = dict.fromkeys(("encoding", "products", "relevance rows", "ranking", "PMRP"), 0.0)

    def project():
        for key in timers:
            timers[key] = 0.0
        start = time.perf_counter()
        img_embs, caps = scoring.encode(model, images, captions, device)
        scoring.release_freed_memory()  # as evaluation.py does after encoding
        timers["encoding"] = time.perf_counter() - start
        scores = scoring.ModelScores([(model, img_embs, caps, device)], shard_size)
        if in_memory:
            start = time.perf_counter()
            sims = scores.block((0, n_i), (0, n_c))
            timers["products"] = time.perf_counter() - start
            start = time.perf_counter()
            sems = relevance.matrix()
            timers["relevance rows"] = time.perf_counter() - start
            start = time.perf_counter()
            report = evaluation.score_matrix(sims, sems)
            timers["ranking"] = time.perf_counter() - start
            start = time.perf_counter()
            report["pmrp"] = pmrp_scores(sims, codes, n_fold=0)
            timers["PMRP"] = time.perf_counter() - start
            return report
        timed_scores = _Timed(scores, "block", timers, "products")
        timed_relevance = _Timed(relevance, "block", timers, "relevance rows")
        pmrp = _Timed(StreamedPMRP(codes), "add", timers, "PMRP")
        start = time.perf_counter()
        report = scoring.score_streamed(timed_scores, timed_relevance, (0, n_i), (0, n_c), observe=pmrp.add)
        # what is not scoring, relevance or PMRP in the pass: R@K's ranks and ASP's sorts
        timers["ranking"] = time.perf_counter() - start - sum(timers[k] for k in ("products", "relevance rows", "PMRP"))
        start = time.perf_counter()
        report["pmrp"] = pmrp.result()
        timers["PMRP"] += time.perf_counter() - start
        return report

    total_s, peak_mb, report = measure(project, device, once=True)
    if not in_memory:  # timed apart from the streamed evaluation
        report["index"], report["index_curve"] = ann_rows(n_i, n_c, sizes["dims"][2])
    return total_s, peak_mb, report, dict(timers), encoder_flops(sizes, n_i, caption_words) / 1e9


def bench_large_gallery(sizes, device, n_images, sgemm):
    """Streamed evaluation (evaluation.py --stream) of an embedding model on n_images x 5 n_images, and on a fifth
    of that, where the in-memory path is measured too (its metrics against the streamed ones: the diff
    column). Time split: encoding, score products (each pair once per direction), relevance rows (sparse
    TF-IDF products), ranking (R@K ranks and ASP's sorts); growth from the small to the large size."""
    shard = 256  # a chunk of 256 image rows: 128 MB of scores at 125,000 captions (one shard; see scoring.chunk_rows)
    dims = "/".join(map(str, sizes["dims"][:3]))
    small, large = max(5, n_images // 5), n_images
    measured = {}
    for n in (small, large):
        measured[n] = large_gallery_run(sizes, device, n, shard)
    base_s, base_mb, base_report, base_timers, _ = large_gallery_run(sizes, device, small, shard, in_memory=True)
    streamed = measured[small][2]
    diff = max([abs(streamed[d][k] - base_report[d][k]) for d in ("i2t", "t2i")
                for k in ("r1", "r5", "r10", "medr", "meanr", "asp")]
               + [abs(streamed["pmrp"][d][k] - base_report["pmrp"][d][k]) for d in ("i2t", "t2i") for k in ("pmrp", "pmr1")])
    rows = []
    (s_s, s_mb), (l_s, l_mb) = ((measured[n][0], measured[n][1]) for n in (small, large))
    time_power = extrapolate((small, large), (s_s, l_s), large)[1]
    mem_power = extrapolate((small, large), (max(s_mb, 1e-3), max(l_mb, 1e-3)), large)[1]
    for n in (small, large):
        total_s, peak_mb, report, timers, encoder_gflop = measured[n]
        n_c = 5 * n
        product_gflop = 2 * 2 * n * n_c * sizes["dims"][2] / 1e9  # each pair once per direction
        matrix_mb = n * n_c * 4 / 2 ** 20
        if n == small:
            base = (base_s, base_mb)
            base_note = (f"baseline: in memory (the whole matrix, {matrix_mb:,.0f} MB, and the dense relevance; "
                         f"products {base_timers['products']:.1f} s, relevance {base_timers['relevance rows']:.1f} s, "
                         f"ranking {base_timers['ranking']:.1f} s, PMRP {base_timers['PMRP']:.1f} s); diff: largest metric difference")
        else:
            # encoding grows as n, the rest as the pairs (n^2); memory: the whole matrix and the dense relevance
            base = (base_timers["encoding"] * n / small + (base_s - base_timers["encoding"]) * (n / small) ** 2,
                    base_mb + 2 * 4 * 5 * (n * n - small * small) / 2 ** 20)
            base_note = ("baseline: in memory, extrapolated from the small size (encoding x n, the rest x n^2; memory "
                         "+ the larger matrix and dense relevance)")
        rows.append(row(f"large gallery VSE, streamed", f"{n:,} images x {n_c:,} captions, dims {dims}", base,
                        (total_s, peak_mb), diff if n == small else None, extrapolated=n != small,
                        mem=_torch_mem(device), flops=(product_gflop + encoder_gflop) * 1e9, timers=timers,
                        index=report["index"],
                        note=f"encoding {timers['encoding']:.1f} s ({encoder_gflop / max(timers['encoding'], 1e-9):.0f} "
                             f"GFLOP/s), products {timers['products']:.1f} s ({product_gflop:,.0f} GFLOP, "
                             f"{product_gflop / max(timers['products'], 1e-9):.0f} GFLOP/s"
                             + (f", {100 * product_gflop / max(timers['products'], 1e-9) / sgemm:.0f} % of sgemm"
                                if sgemm else "") + f"), relevance rows {timers['relevance rows']:.1f} s, ranking "
                             f"{timers['ranking']:.1f} s, PMRP {timers['PMRP']:.1f} s; "
                             + "".join(f"{kind} index (stand-in embeddings): recall of the exact top {ANN_K} i2t "
                                       f"{i2t:.4f} / t2i {t2i:.4f}, built in {build:.1f} s, searched in {search:.1f} s "
                                       f"against {exact:.1f} s of exact search (products + top {ANN_K}): "
                                       f"{exact / max(search, 1e-9):.1f}x ("
                                       + ", ".join(f"{'efSearch' if kind == 'hnsw' else 'nprobe'} {effort}: "
                                                   f"{min(c_i2t, c_t2i):.4f}, {exact / max(c_s, 1e-9):.1f}x"
                                                   for effort, c_i2t, c_t2i, c_s in report["index_curve"][kind])
                                       + "); "
                                       for kind, (i2t, t2i, build, search, exact) in report["index"].items()) + f"peak {peak_mb:,.0f} MB against "
                             f"{matrix_mb:,.0f} MB for the matrix alone; growth {small:,} -> {large:,} images: time "
                             f"x n^{time_power:.2f}, memory x n^{mem_power:.2f}; R@1 i2t {report['i2t']['r1']:.2f}; "
                             f"{base_note}"))
    return rows


def bench_tfidf(sizes):
    """Semantic relevance of n captions: dense (subsets, extrapolated) vs sparse (full size)."""
    n = sizes["tfidf"]
    captions = synthetic_captions(n)
    cpu = torch.device("cpu")
    subsets = sizes["tfidf_subsets"]
    measured = {}
    for k in subsets:
        seconds, peak, dense = measure(lambda: relevance_dense(captions[:k]), cpu)
        measured[k] = (seconds, peak)
    diff = max_abs_diff([(SemanticRelevance(captions[:subsets[1]]).matrix(), dense)])
    del dense  # the (k / 5, k) matrix
    proj = measure(lambda: SemanticRelevance(captions), cpu)
    vocabulary = proj[2].caption_rows.shape[1]
    base_s, p_s = extrapolate(subsets, [measured[k][0] for k in subsets], n)
    base_mb, p_mb = extrapolate(subsets, [measured[k][1] for k in subsets], n)
    dense_gb = n * vocabulary * 8 / 2 ** 30
    return [row("TF-IDF relevance", f"{n:,} captions, {vocabulary:,} words", (base_s, base_mb), proj[:2], diff,
                extrapolated=True,
                note=f"baseline (dense TF-IDF + dense M) extrapolated as n^p from {subsets[0]:,} and "
                     f"{subsets[1]:,} captions (time p = {p_s:.2f}, memory p = {p_mb:.2f}); one dense float64 "
                     f"TF-IDF alone is {dense_gb:.0f} GB; project = sparse build, M served by blocks; "
                     f"diff at {subsets[1]:,} captions")]


def np2h_whole_file(npy_path, h5_path):
    """The original conversion: the whole array read into memory, then written as one HDF5 dataset."""
    features = np.load(npy_path)
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("feat", data=features)


def bench_np2h(sizes, tmp_dir):
    """{split}_ims.npy -> HDF5: measured on a file of n images, then scaled to COCO train."""
    n = sizes["np2h_images"]
    directory = tempfile.mkdtemp(prefix="bench_np2h_", dir=tmp_dir)
    try:
        npy_path = os.path.join(directory, "train_ims.npy")
        rng = np.random.default_rng(4)
        features = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(n, 36, 2048))
        for start in range(0, n, 100):  # written in pieces: the input file is not held in memory either
            features[start:start + 100] = rng.random((min(100, n - start), 36, 2048), dtype=np.float32)
        features.flush()
        del features
        cpu = torch.device("cpu")
        base_path, proj_path = os.path.join(directory, "base.h5"), os.path.join(directory, "train.h5")
        base = measure(lambda: np2h_whole_file(npy_path, base_path), cpu)

        def project():
            if os.path.exists(proj_path):  # a finished .h5 would be skipped
                os.remove(proj_path)
            np2h.convert(npy_path, proj_path, progress=False)

        proj = measure(project, cpu)
        diff = 0.0
        with h5py.File(base_path, "r") as b, h5py.File(proj_path, "r") as p:
            for start in range(0, n, 100):
                diff = max(diff, max_abs_diff([(p["feat"][start:start + 100], b["feat"][start:start + 100])]))
        size_mb = os.path.getsize(npy_path) / 2 ** 20
    finally:
        shutil.rmtree(directory)
    scale = COCO_TRAIN_IMAGES / n
    return [row("np2h", f"{n} images ({size_mb:,.0f} MB .npy)", base[:2], proj[:2], diff,
                note="file in the page cache; writes not synced"),
            row("np2h", f"COCO train, {COCO_TRAIN_IMAGES:,} images ({size_mb * scale / 1024:,.1f} GB .npy)",
                (base[0] * scale, base[1] * scale), (proj[0] * scale, proj[1]), None, extrapolated=True,
                proj_extrapolated=True,
                note="both times and the baseline's memory scaled linearly with the file from the row above; "
                     "the project's memory is one block whatever the size")]


def standin_embeddings(n_images, n_captions, dim, seed=5):
    """What a trained embedding model (VSE) scores, built as make_synthetic_data.py builds its data: each image
    holds 2-4 objects of 80 categories (skewed frequencies) with one of 8 colours, in one of 8 scenes; its
    embedding is the sum of those concepts' fixed random unit prototypes (each object's category + half its
    colour, the scene at half weight) plus its own noise, the image's 4 remaining degrees of freedom
    (norm 0.5); caption j is its image j // 5's plus a caption's noise (norm 0.5: cosine ~0.9 to its image,
    as a trained model puts a caption near its image). l2-normalised float32 (n_images, dim), (n_captions, dim).

    The noise lives in a 64-dimensional subspace, as a trained model's embeddings concentrate on a few
    directions: an index then finds the same neighbours a trained model's would. (Isotropic noise over
    every dimension, as before, makes every item's neighbours random directions, which no trained model
    gives: recall 0.25 at 25K x 125K.)"""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    categories, colours, scenes, basis = unit(80, dim), unit(8, dim), unit(8, dim), unit(64, dim)
    weights = 1.0 / torch.arange(1, 81) ** 0.7  # skewed category frequencies
    n_objects = torch.randint(2, 5, (n_images,), generator=gen)
    objects = torch.multinomial(weights.expand(n_images, -1), 4, replacement=False, generator=gen)  # (n, 4)
    present = (torch.arange(4) < n_objects[:, None]).float()[..., None]  # (n, 4, 1)
    colour = torch.randint(0, 8, (n_images, 4), generator=gen)
    images = (present * (categories[objects] + 0.5 * colours[colour])).sum(1)
    images = images + 0.5 * scenes[torch.randint(0, 8, (n_images,), generator=gen)]
    noise = lambda n: torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1) @ basis  # noqa: E731
    images = torch.nn.functional.normalize(images, dim=1)
    images = torch.nn.functional.normalize(images + 0.5 * noise(n_images), dim=1)
    captions = images.repeat_interleave(5, 0)[:n_captions] + 0.5 * noise(n_captions)
    return images, torch.nn.functional.normalize(captions, dim=1)


def standin_shortlist(n_images, n_captions, dim, seed=5):
    """A function computing the (n_images, n_captions) float32 product of standin_embeddings."""
    images, captions = standin_embeddings(n_images, n_captions, dim, seed)
    return lambda: (images @ captions.T).numpy()


def pair_rates(sizes, device, module_name, per_image):
    """Pairs/s of one model: every pair of a block (similarity_block, plain evaluation), and for each count
    in per_image one call per image with that many random captions (similarity_pairs, --shortlist).
    Returns (full pairs/s, [pairs/s per count], max abs diff of the shortlisted scores to the full ones).
    Best of MAX_RUNS interleaved runs: a shared machine's load swings hit both kinds alike."""
    # Twice as many captions as an image needs: its captions are a part of the pool, never all of it (a shard
    # whose every pair is needed would be scored as a block, as plain evaluation does).
    n_block, n_pool = sizes["shortlist_block"][0], max(sizes["shortlist_block"][1], 2 * max(per_image))
    images, captions, lengths = random_inputs(n_block, n_pool, sizes, device, seed=6)
    model = build_model(sizes, module_name, device).eval()
    with torch.no_grad():
        img_embs, cap_embs = model.encode_images(images).cpu(), model.encode_captions(captions, lengths).cpu()
    batches = [(0, cap_embs, lengths)]
    with torch.no_grad():  # each item's own work (global vectors), done once per item for all its pairs
        split = scoring.EncodedSplit(model, img_embs, batches, 1000, device)
    n_full, n_images = sizes["shortlist_block"][1], sizes["shortlist_images"]
    rng = np.random.default_rng(7)
    needed = []
    for m in per_image:
        mask = np.zeros((n_images, n_pool), dtype=bool)
        for row_mask in mask:
            row_mask[rng.choice(n_pool, size=m, replace=False)] = True
        needed.append(mask)
    evaluation.similarity_block(model, img_embs[:2], batches, (0, 2), (0, 4), 1000, device)  # warm-up
    full_s, pairs_s, scores = [], [[] for _ in needed], [None] * len(needed)
    for _ in range(MAX_RUNS):
        full_s.append(measure(lambda: evaluation.similarity_block(
            model, img_embs, batches, (0, n_block), (0, n_full), 1000, device), device, once=True)[0])
        for j, mask in enumerate(needed):
            seconds, _, (scores[j],) = measure(lambda: evaluation.similarity_pairs(
                split, [((0, n_images), (0, n_pool))], [mask], 1000), device, once=True)
            pairs_s[j].append(seconds)
    reference = evaluation.similarity_block(model, img_embs, batches, (0, n_images), (0, n_pool), 1000, device)
    diff = max_abs_diff([(s[mask], reference[mask]) for s, mask in zip(scores, needed)])
    return n_block * n_full / min(full_s), [mask.sum() / min(t) for mask, t in zip(needed, pairs_s)], diff


def shortlist_quality(sizes, device, sgr, saf, shortlist, data_path):
    """R@K and ASP of evaluation.py on `data_path`'s COCO testall: plain SGRAF vs --shortlist for each K, with
    the time of each run (encoders included, one process, what a user waits for)."""
    common = ["--model_path", sgr, "--model_path2", saf, "--data_path", data_path, "--split", "testall",
              "--device", device.type, "--threads", str(torch.get_num_threads())]
    cpu = torch.device("cpu")
    plain_s, plain_mb, plain = measure(lambda: evaluation.main(common), cpu, once=True)

    def summary(report):
        return "; ".join(f"{d} R@1/5/10 {report[d]['r1']:.1f}/{report[d]['r5']:.1f}/{report[d]['r10']:.1f} ASP "
                         f"{report[d]['asp']:.1f}" for d in ("i2t", "t2i")) + f"; rsum {report['rsum']:.1f}"

    rows = []
    for k in sizes["shortlist_k"]:
        two_s, two_mb, two = measure(lambda: evaluation.main(common + ["--shortlist", shortlist, "--shortlist_k",
                                                                       str(k)]), cpu, once=True)
        rows.append(row(f"shortlist quality K = {k}", f"{plain['n_images']} x {plain['n_captions']}, {data_path}",
                        (plain_s, plain_mb), (two_s, two_mb), None,
                        note=f"{os.path.basename(os.path.dirname(shortlist))} shortlists "
                             f"{two['shortlist']['pairs_scored']:,} of {two['shortlist']['pairs_total']:,} pairs; "
                             f"two-stage: {summary(two)}; plain SGRAF: {summary(plain)}"))
    return rows


def bench_shortlist(sizes, device, quality=None):
    """Two-stage retrieval against full SGRAF scoring at 5K scale (time rows), and on trained checkpoints
    when `quality` = (SGR, SAF, shortlist checkpoint, data path) is given (quality rows)."""
    n_img, n_cap = sizes["shortlist_scale"]
    cpu = torch.device("cpu")
    product_s, product_mb, shortlist = measure(standin_shortlist(n_img, n_cap, sizes["dims"][2]), cpu)
    masks = {k: measure(lambda: evaluation.shortlist_masks(shortlist, k), cpu) for k in sizes["shortlist_k"]}
    pairs = {k: int((i2t_mask | t2i_mask).sum()) for k, (_, _, (i2t_mask, t2i_mask)) in masks.items()}
    k_max = max(sizes["shortlist_k"])
    i2t_mask, t2i_mask = masks[k_max][2]
    # The two rankings cost two sorts of every query row whatever K; the stand-in's scores serve as the
    # main model's (only the candidates' are read).
    ranking_s, ranking_mb, _ = measure(lambda: (evaluation.two_stage_values(shortlist, shortlist, i2t_mask),
                                                evaluation.two_stage_values(shortlist.T, shortlist.T, t2i_mask.T)),
                                       cpu, once=True)
    del i2t_mask, t2i_mask
    per_image = [round(pairs[k] / n_img) for k in sizes["shortlist_k"]]
    rates = {name: pair_rates(sizes, device, name, per_image) for name in ("SGR", "SAF")}
    diff = max(r[2] for r in rates.values())
    full_s = sum(n_img * n_cap / r[0] for r in rates.values())
    full_mb = 3 * n_img * n_cap * 4 / 2 ** 20  # plain SGRAF holds the two models' matrices and their mean
    dims = "/".join(map(str, sizes["dims"]))
    rows = []
    for j, k in enumerate(sizes["shortlist_k"]):
        scoring_s = sum(pairs[k] / r[1][j] for r in rates.values())
        total = product_s + masks[k][0] + scoring_s + ranking_s
        peak = max(product_mb, masks[k][1], ranking_mb)
        rows.append(row(f"shortlist K = {k}", f"{n_img:,} x {n_cap:,}, dims {dims}", (full_s, full_mb), (total, peak),
                        diff, extrapolated=True, proj_extrapolated=True,
                        note=f"{pairs[k]:,} pairs scored ({100 * pairs[k] / (n_img * n_cap):.2f} %, {per_image[j]} per "
                             f"image) by SGR and SAF at {rates['SGR'][1][j]:,.0f} / {rates['SAF'][1][j]:,.0f} pairs/s "
                             f"(full: {rates['SGR'][0]:,.0f} / {rates['SAF'][0]:,.0f}): {scoring_s:,.0f} s; "
                             f"shortlist model (embedding product) {product_s:.1f} s, candidates {masks[k][0]:.1f} s, "
                             f"two rankings {ranking_s:.1f} s; baseline: every pair by each model, memory the "
                             f"two models' matrices and their mean; encoders excluded; diff: shortlisted vs full "
                             f"scores"))
    if quality:
        rows += shortlist_quality(sizes, device, *quality)
    return rows


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
            for kind, (i2t, t2i, build, search, exact_s) in r["index"].items():
                out.append((f"--shortlist_index {kind} there: recall >= 0.99 of the exact top {ANN_K}, search >= 5x "
                            f"faster than exact search", f"recall {min(i2t, t2i):.4f}, {exact_s / max(search, 1e-9):.1f}x "
                            f"(building {build:.0f} s)", "yes" if min(i2t, t2i) >= 0.99 and exact_s >= 5 * search else "no"))
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
    MAX_RUNS = 1 if args.quick else 3
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
