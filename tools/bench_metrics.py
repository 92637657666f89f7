"""tools.bench's metric and data-file cases: asp (exact ASP), pmrp (PMRP, in process and as a whole process),
tfidf (the semantic relevance) and np2h (features to HDF5), each against its baseline in tools/baselines/ or the
original's code."""
import os
import shutil
import sys
import tempfile

import h5py
import numpy as np
import torch

import evaluation
import fileio
import np2h
from daa_loss import SemanticRelevance
from pmrp_com.pmrp import pmrp_scores
from tools.baselines.asp_sort import asp_sort
from tools.baselines.pmrp_dict import pmrp_dict
from tools.baselines.tfidf_dense import relevance_dense
from tools.bench_common import (extrapolate, max_abs_diff, measure, measure_process, random_codes, row,
                                synthetic_captions)

COCO_TRAIN_IMAGES = 113287  # (113,287, 36, 2048) float32 = 31.1 GB (MB and GB here are 2^20 and 2^30 bytes)


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
