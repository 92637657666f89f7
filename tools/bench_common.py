"""tools.bench's shared parts: the sizes and tolerances, measurement (time and peak memory of a call or of a
process), the flop counts of the roofline column, table rows, and the random inputs every case builds from.
The flop counts follow tools/bench.py's docstring (the "module docstring" below)."""
import argparse
import gc
import os
import subprocess
import time

import numpy as np
import torch
import torch.nn as nn

import evaluation
from layout import REGIONS
from model import SimilarityModel

REPEAT_UNDER_S = 1.0  # runs shorter than this are repeated (best of MAX_RUNS)
MAX_RUNS = 3  # 1 with --quick, a smoke run
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


def encoder_flops(sizes, n_images, caption_words):
    """Multiply-adds x 2 of the image fc (every region) and the bi-GRU (every word, both directions:
    3 gates x (input + hidden) matrix products)."""
    img_dim, word_dim, embed_size, _ = sizes["dims"]
    return 2 * n_images * 36 * img_dim * embed_size + 2 * 2 * caption_words * 3 * embed_size * (word_dim + embed_size)


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
