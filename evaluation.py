"""Evaluation: R@K (SCAN convention), ASP, from a checkpoint or from saved similarity matrices.

    python evaluation.py --model_path CKPT [--model_path2 CKPT2] [--split testall] [--fold5]
                         [--save_sims S.npy] [--save_ranks F --topk 10] [--json OUT] [--eccv]
    python evaluation.py --sims S.npy [--sims S2.npy ...] --data_path D --data_name N --split S
                         [--fold5] --json OUT

A similarity matrix is (n_images, n_captions) = (n, 5n), rows in image order, columns in caption
order; captions 5i..5i+4 belong to image i. Several matrices (two checkpoints, several --sims) are
averaged: SGRAF = mean of an SGR and an SAF matrix.

R@K. i2t: rank of image i = min over its captions c of #{distractors a : s[i, a] >= s[i, c]} (its other
captions never count against c); t2i: rank of caption j = #{a != j // 5 : s[a, j] >= s[j // 5, j]}. Ties
with a distractor count against the query, so a constant matrix gets R@1 = 0 and no value depends on
a sort order. Computed by comparisons in chunks of rows (or columns), no sorting.

ASP: for each query row, rank_s(c) = 1 + #{a != c : s[a] >= s[c]} (a tied score ranks after everything
it ties with: a model earns no credit for the ties it makes, so a constant matrix scores about 50, like
random scores) and rank_r(c) = 1 + #{a : r[a] > r[c]} + 1/2 #{a != c : r[a] = r[c]} on the relevance M
(equal relevance is genuine: the average rank of a tied block); ASP = 100 mean min(rank_s, rank_r) /
max(...). i2t queries are rows of S and M, t2i rows of S^T and M^T. M is daa_loss.SemanticRelevance on
the split's captions (the dev split is cut to its first 5000 captions, as data.py does); in a fold, ASP
uses the fold's block of S and of M (M fit on the whole split).

--fold5: COCO 1K, the mean over 5 folds of images f n/5 .. (f+1) n/5 - 1 and their captions.
"""
import concurrent.futures
import contextlib
import datetime
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import errors
import fileio
from errors import InputError

# Elements of one chunk of rows in the rank computations: 2^20 x (1-8 bytes) x about 15 temporaries.
CHUNK_ELEMENTS = 1 << 20
KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------------
# Metrics of a similarity matrix


def _chunks(n, length):
    """Slices of at most CHUNK_ELEMENTS // length rows covering range(n)."""
    step = max(1, CHUNK_ELEMENTS // max(1, length))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _check_square5(sims):
    n_img, n_cap = sims.shape
    if n_cap != 5 * n_img:
        raise ValueError(f"expected an (n_images, 5 n_images) matrix, got {sims.shape}")


def i2t_ranks(sims):
    """0-based rank of every image query: int64 (n_images,), best of its 5 captions, distractor ties against it."""
    _check_square5(sims)
    n_img, n_cap = sims.shape
    ranks = np.empty(n_img, dtype=np.int64)
    for rows in _chunks(n_img, n_cap):
        block = np.asarray(sims[rows])  # (b, n_cap)
        own = np.arange(rows.start, rows.stop)[:, None] * 5 + np.arange(5)  # (b, 5) own captions
        gt = block[np.arange(block.shape[0])[:, None], own]
        # #{a : s[a] >= s[c]} minus the own captions >= s[c] (c itself among them): the distractors >= s[c]
        counts = np.stack([(block >= gt[:, k:k + 1]).sum(1) - (gt >= gt[:, k:k + 1]).sum(1) for k in range(5)], axis=1)
        ranks[rows] = counts.min(1)
    return ranks


def t2i_ranks(sims):
    """0-based rank of every caption query: int64 (n_captions,), position of image j // 5, ties against it."""
    _check_square5(sims)
    n_img, n_cap = sims.shape
    ranks = np.empty(n_cap, dtype=np.int64)
    for cols in _chunks(n_cap, n_img):
        block = np.asarray(sims[:, cols])  # (n_img, b)
        caption = np.arange(cols.start, cols.stop)
        gt = block[caption // 5, caption - cols.start]  # (b,)
        ranks[cols] = (block >= gt[None, :]).sum(0) - 1
    return ranks


def recall_summary(ranks):
    """(r1, r5, r10, medr, meanr) of 0-based ranks: R@K in percent, medr/meanr 1-based."""
    r1, r5, r10 = (100.0 * float(np.mean(ranks < k)) for k in KS)
    return r1, r5, r10, float(np.floor(np.median(ranks)) + 1), float(ranks.mean() + 1)


def _sort_rows(x):
    """(order, sorted values) of each row of x (b, n), ascending: int64 and x.dtype (b, n).

    float32 rows are sorted as single uint64 keys (the float's order-preserving bit pattern in the high
    half, the column in the low half), which numpy sorts several times faster than an argsort; other
    dtypes take np.argsort. Equal values may come in any order: the ranks below depend on values only.
    """
    if x.dtype != np.float32:
        order = np.argsort(x, axis=1)
        return order, np.take_along_axis(x, order, axis=1)
    bits = (x + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into +0.0, so equal floats get equal keys
    bits = bits ^ ((bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))  # negatives flipped
    keys = np.sort((bits.astype(np.uint64) << np.uint64(32)) | np.arange(x.shape[1], dtype=np.uint64), axis=1)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return order, np.take_along_axis(x, order, axis=1)


def _tie_bounds(values):
    """First and last position of each sorted position's block of equal values: int64 (b, n) twice."""
    b, n = values.shape
    position = np.broadcast_to(np.arange(n), (b, n))
    starts = np.ones((b, n), dtype=bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = np.ones((b, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, n - 1)[:, ::-1], axis=1)[:, ::-1]
    return first, last


def _asp_rows(s, r):
    """Sum over the rows of s and r (b, n) of min(rank_s, rank_r) / max(rank_s, rank_r) (a float)."""
    n = s.shape[1]
    # Twice the ranks, so that every rank is an exact integer. In ascending order a block of equal
    # values spans positions first..last: #{a : x[a] < x[c]} = first, #{a : x[a] <= x[c]} = last + 1.
    twice_rank = []
    order, values = _sort_rows(s)
    first, _ = _tie_bounds(values)
    twice_rank.append((order, 2 * (n - first)))  # rank_s = #{a : s[a] >= s[c]}, c counting as the 1
    order, values = _sort_rows(r)
    first, last = _tie_bounds(values)
    twice_rank.append((order, 2 * n - first - last))  # 2 (1 + #{>} + 1/2 #{=, != c}) = 2n - first - last
    rank_s, rank_r = (np.empty(s.shape, dtype=np.int64) for _ in range(2))
    for out, (order, ranks) in zip((rank_s, rank_r), twice_rank):
        np.put_along_axis(out, order, ranks, axis=1)
    return float((np.minimum(rank_s, rank_r) / np.maximum(rank_s, rank_r)).sum())


def asp(sims, sems):
    """Exact ASP in percent of query rows of `sims` against `sems` (same shape; may be transposed views).

    Chunks of rows are ranked by sorting (no per-item comparisons), on as many threads as torch uses
    (numpy's sorts release the GIL); memory is a few chunk-sized buffers per thread.
    """
    if sims.shape != sems.shape:
        raise ValueError(f"similarity {sims.shape} and relevance {sems.shape} differ in shape")
    n_q, n = sims.shape
    with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        parts = pool.map(lambda rows: _asp_rows(np.ascontiguousarray(sims[rows]), np.ascontiguousarray(sems[rows])),
                         _chunks(n_q, n))
        return 100.0 * sum(parts) / (n_q * n)


def i2t(sims, sems=None):
    """Image-to-text (r1, r5, r10, medr, meanr, asp) of an (n, 5n) matrix; asp None without sems."""
    return recall_summary(i2t_ranks(sims)) + (None if sems is None else asp(sims, sems),)


def t2i(sims, sems=None):
    """Text-to-image (r1, r5, r10, medr, meanr, asp) of an (n, 5n) matrix; asp None without sems."""
    return recall_summary(t2i_ranks(sims)) + (None if sems is None else asp(sims.T, sems.T),)


def _direction(values):
    return dict(zip(("r1", "r5", "r10", "medr", "meanr", "asp"), values))


def score_matrix(sims, sems=None):
    """{"i2t": {r1, r5, r10, medr, meanr, asp}, "t2i": {...}, "rsum"} of one (n, 5n) block."""
    out = {"i2t": _direction(i2t(sims, sems)), "t2i": _direction(t2i(sims, sems))}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def fold_bounds(n_images, n_folds=5):
    """[(first image, end image)] of the folds: images f n/5 .. (f+1) n/5 - 1."""
    return [(f * n_images // n_folds, (f + 1) * n_images // n_folds) for f in range(n_folds)]


def mean_scores(blocks):
    """Fold mean of score_matrix dicts (asp stays None where it is None) plus the "folds" list."""
    out = {}
    for d in ("i2t", "t2i"):
        out[d] = {key: (None if blocks[0][d][key] is None else float(np.mean([b[d][key] for b in blocks])))
                  for key in blocks[0][d]}
    out["rsum"] = float(np.mean([b["rsum"] for b in blocks]))
    out["folds"] = blocks
    return out


def score_folds(sims, sems=None, n_folds=5):
    """COCO 1K: score_matrix of each diagonal fold block, their mean at the top level, and "folds"."""
    blocks = []
    for lo, hi in fold_bounds(sims.shape[0], n_folds):
        block_sems = None if sems is None else sems[lo:hi, 5 * lo:5 * hi]
        blocks.append(score_matrix(sims[lo:hi, 5 * lo:5 * hi], block_sems))
    return mean_scores(blocks)


def topk_rows(matrix, k):
    """Top-k column indices of every row of `matrix` (n_q, n): int64 (n_q, min(k, n)).

    Descending score, ties by lower index (what a stable sort of -score gives), without sorting rows:
    the k-th largest value v comes from a partition; the items > v and the lowest-index items == v
    make exactly k, which are then ordered among themselves.
    """
    n_q, n = matrix.shape
    k = min(k, n)
    idx = np.empty((n_q, k), dtype=np.int64)
    for rows in _chunks(n_q, n):
        block = np.ascontiguousarray(matrix[rows])
        kth = -np.partition(-block, k - 1, axis=1)[:, k - 1:k]  # (b, 1) k-th largest value
        above = block > kth
        tied = block == kth
        room = k - above.sum(1, keepdims=True)  # slots left for the tied items, lowest index first
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
        cols = np.nonzero(chosen)[1].reshape(-1, k)  # row-major: each row's chosen columns, ascending
        order = np.argsort(-np.take_along_axis(block, cols, axis=1), axis=1, kind="stable")
        idx[rows] = np.take_along_axis(cols, order, axis=1)
    return idx


def topk_rankings(sims, k):
    """Top-k of every query, both directions: (i2t_idx (n_img, k), i2t_scores, t2i_idx (n_cap, k), t2i_scores).

    i2t: caption columns per image row; t2i: image rows per caption column; see topk_rows for the order.
    """
    i2t_idx, t2i_idx = topk_rows(sims, k), topk_rows(sims.T, k)
    return (i2t_idx, np.take_along_axis(sims, i2t_idx, axis=1), t2i_idx, np.take_along_axis(sims.T, t2i_idx, axis=1))


# ------------------------------------------------------------------------------------------------
# Similarity matrices on disk


def load_sims(paths, n_captions=None, captions_file=None):
    """Load and average similarity matrices (.npy), checked: (n, 5n) float, finite, same shapes.

    With n_captions, the shape must be (n_captions / 5, n_captions) (the split's size, from
    `captions_file`). A transposed matrix, NaN/inf, a file that is not .npy -> InputError naming it.
    Returns float32, or float64 if any input is float64.
    """
    total, shape = None, None
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: similarity matrix not found")
        try:
            mat = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # np.load reads 'PK...' as .npz
            raise InputError(f"{path}: not a .npy array ({str(err)[:120]})") from None
        if not isinstance(mat, np.ndarray) or mat.ndim != 2 or mat.dtype.kind not in "fiu":
            raise InputError(f"{path}: expected a 2-D numeric (n_images, n_captions) array, got "
                             f"{getattr(mat, 'shape', '?')} {getattr(mat, 'dtype', '?')}")
        rows, cols = mat.shape
        if n_captions is not None:
            expected = (n_captions // 5, n_captions)
            if (rows, cols) != expected:
                hint = " (it looks transposed: rows must be images, columns captions)" \
                    if (cols, rows) == expected else ""
                raise InputError(f"{path}: shape {mat.shape} does not match {captions_file} "
                                 f"({n_captions} captions -> expected {expected}){hint}")
        elif cols != 5 * rows:
            hint = " (it looks transposed: rows must be images, columns captions)" if rows == 5 * cols else ""
            raise InputError(f"{path}: shape {mat.shape} is not (n_images, 5 n_images){hint}")
        if shape is not None and mat.shape != shape:
            raise InputError(f"{path}: shape {mat.shape} differs from {paths[0]}'s {shape}")
        shape = mat.shape
        mat = np.array(mat, dtype=np.float64 if mat.dtype == np.float64 else np.float32)
        finite = np.isfinite(mat)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise InputError(f"{path}: {int((~finite).sum())} entries are NaN or inf (first at [{r}, {c}])")
        total = mat if total is None else total + mat
    return total if len(paths) == 1 else total / len(paths)


def git_commit():
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def json_safe(value):
    """Options and paths as plain JSON types (anything else as its str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def provenance(argv, **fields):
    """The provenance block every JSON output carries."""
    out = {key: json_safe(value) for key, value in fields.items()}
    args = list(argv if argv is not None else sys.argv[1:])
    out.update({"git_commit": git_commit(), "argv": sys.argv[:1] + args,
                "date": datetime.datetime.now().isoformat(timespec="seconds")})
    return out


# ------------------------------------------------------------------------------------------------
# Similarities from a model


def resolve_device(device):
    """'auto' -> cuda when present, else cpu; a torch.device passes through."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return device


@torch.no_grad()
def encode(model, image_loader, caption_loader, device):
    """Encode every image and caption once.

    Returns img_embs (n_img, 36, d) on the CPU, and the captions as a list of
    (first caption index, embeddings (b, L_b, d) on the CPU, lengths (b,)) per loader batch, each
    batch padded only to its own longest caption.
    """
    model.eval()
    img_embs = []
    for images, _ in tqdm(image_loader, desc="encode images", leave=False, disable=None):
        img_embs.append(model.encode_images(images.to(device)).float().cpu())
    captions, start = [], 0
    for caps, lengths, _ in tqdm(caption_loader, desc="encode captions", leave=False, disable=None):
        captions.append((start, model.encode_captions(caps.to(device), lengths.to(device)).float().cpu(), lengths))
        start += len(lengths)
    return torch.cat(img_embs), captions


def _caption_slice(captions, lo, hi):
    """Embeddings (hi - lo, L, d) and lengths of captions lo..hi-1, padded to their longest."""
    pieces = []
    for start, embs, lengths in captions:
        a, b = max(lo, start), min(hi, start + len(lengths))
        if a < b:
            pieces.append((embs[a - start:b - start], lengths[a - start:b - start]))
    lengths = torch.cat([p[1] for p in pieces])
    width = int(lengths.max())  # a loader batch may be padded longer than this slice needs
    out = torch.zeros(len(lengths), width, pieces[0][0].shape[2])
    row = 0
    for embs, lens in pieces:
        w = min(width, embs.shape[1])
        out[row:row + len(lens), :w] = embs[:, :w]
        row += len(lens)
    return out, lengths


@torch.no_grad()
def similarity_block(model, img_embs, captions, images, caps, shard_size, device, bar=None, rank=0, world=1):
    """Scores of image range `images` x caption range `caps` (pairs of ints), in shards: float32 numpy.

    With world > 1 this process scores only shards k with k % world == rank and leaves the others 0;
    the shards are the same as in a single-process run, so the summed matrices are bit-identical to it.
    """
    (i0, i1), (c0, c1) = images, caps
    out = np.zeros((i1 - i0, c1 - c0), dtype=np.float32)
    shard = -1
    for a in range(i0, i1, shard_size):
        imgs = img_embs[a:min(a + shard_size, i1)].to(device)
        for c in range(c0, c1, shard_size):
            shard += 1
            if shard % world != rank:
                continue
            embs, lengths = _caption_slice(captions, c, min(c + shard_size, c1))
            sims = model.similarity(imgs, embs.to(device), lengths.to(device))
            out[a - i0:a - i0 + len(imgs), c - c0:c - c0 + len(lengths)] = sims.float().cpu().numpy()
            if bar is not None:
                bar.update(len(imgs) * len(lengths))
    return out


PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision(name, device):
    """Numerics of the encoders and the similarity path; the score head and all ranking stay fp32.

    fp32: exact. tf32: TF32 tensor-core matmuls on CUDA (no effect on a CPU). bf16: autocast to
    bfloat16 (on CUDA, and on CPUs with bf16 support).
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} (got {name!r})")
    previous = torch.get_float32_matmul_precision()
    if name == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def compute_sims(model, image_loader, caption_loader, shard_size=1000, device=None, blocks=None,
                 precision_name="fp32"):
    """The (n_img, n_cap) similarity matrix of a model, float32, in shards of images x captions.

    Images and captions are encoded once; each shard of `shard_size` images x `shard_size` captions is
    scored by model.similarity on `device` (default: GPU when present). With `blocks` (a list of
    ((i0, i1), (c0, c1)) ranges), only those blocks are scored and a list of matrices is returned.
    Inside an initialised torch.distributed group the shards are dealt out round robin and summed on
    rank 0 (every other entry of a process's matrix is 0): rank 0 returns the result, other ranks None.
    """
    device = resolve_device(device)
    rank, world = distributed.rank_and_world()
    model.to(device).eval()
    with precision(precision_name, device):
        img_embs, captions = encode(model, image_loader, caption_loader, device)
        wanted = blocks if blocks is not None else [((0, len(img_embs)), (0, sum(len(c[2]) for c in captions)))]
        pairs = sum((i1 - i0) * (c1 - c0) for (i0, i1), (c0, c1) in wanted)
        with tqdm(total=pairs // world, desc="similarities", unit="pair", unit_scale=True,
                  disable=None if rank == 0 else True) as bar:
            out = [similarity_block(model, img_embs, captions, i, c, shard_size, device, bar, rank, world)
                   for i, c in wanted]
    if world > 1:
        reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")  # nccl: CUDA tensors
        for k, part in enumerate(out):
            summed = torch.from_numpy(part).to(reduce_device)
            dist.reduce(summed, dst=0, op=dist.ReduceOp.SUM)
            out[k] = summed.cpu().numpy()
        if rank != 0:
            return None
    return out if blocks is not None else out[0]


def validate(model, image_loader, caption_loader, relevance, device=None, shard_size=1000, precision_name="fp32"):
    """Dev-set R@K and ASP: score_matrix of the model's matrix; `relevance` a SemanticRelevance.

    In a torch.distributed group every rank must call it (each scores a share of the matrix); rank 0
    returns the scores, the others None.
    """
    sims = compute_sims(model, image_loader, caption_loader, shard_size, device, precision_name=precision_name)
    return None if sims is None else score_matrix(sims, relevance.matrix())


# ------------------------------------------------------------------------------------------------
# ECCV Caption and CxC (naver-ai/eccv-caption) on COCO testall


def _normalise_caption(text):
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def eccv_caption_ids(captions, image_ids, package_ids, ann_path):
    """COCO caption id of every testall caption line.

    Default: the eccv_caption package's own test-id list (its column order is COCO testall's). With
    captions_val2014.json, each line is matched by text among its image's captions instead (a dozen
    package ids name another caption of the same image). Returns (int64 (n_captions,), how).
    """
    if not os.path.isfile(ann_path):
        return np.asarray(package_ids, dtype=np.int64), "eccv_caption test ids"
    ann = fileio.read_json(ann_path, "COCO captions file")
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise InputError(f"{ann_path}: has no 'annotations' list (not a COCO captions file)")
    by_image = {}
    for a in ann["annotations"]:
        by_image.setdefault(a.get("image_id"), {})[_normalise_caption(str(a.get("caption", "")))] = a.get("id")
    ids = np.asarray(package_ids, dtype=np.int64).copy()
    unmatched = 0
    for j, text in enumerate(captions):
        found = by_image.get(int(image_ids[j // 5]), {}).get(_normalise_caption(text))
        if found is None:
            unmatched += 1  # keep the package's id for this line
        else:
            ids[j] = found
    return ids, f"matched by text in {ann_path} ({unmatched} unmatched lines kept the package's ids)"


def eccv_scores(sims, data_path, data_name, split, ann_root):
    """ECCV Caption mAP@R / R-Precision / R@1 and CxC + COCO 5K R@1/5/10 (percent) of a testall matrix.

    Rows -> COCO image ids from testall_ids.txt; columns -> caption ids (eccv_caption_ids). The
    package's caption->image map must agree with testall_ids.txt on every column.
    """
    import warnings

    import data
    from pmrp_com.pmrp import read_image_ids
    with warnings.catch_warnings():  # the package warns when ujson is missing; json is fine
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

    ids_path = os.path.join(data_path, data_name, "testall_ids.txt")
    image_ids = read_image_ids(ids_path, sims.shape[0])
    metrics = Metrics()
    if sims.shape[1] != len(metrics.coco_ids):
        raise InputError(f"--eccv needs the COCO testall split ({len(metrics.coco_ids)} captions); "
                         f"{split} has {sims.shape[1]}")
    captions = data.read_captions(data_path, data_name, split)
    caption_ids, how = eccv_caption_ids(captions, image_ids, metrics.coco_ids,
                                        os.path.join(ann_root, "captions_val2014.json"))
    c2i = metrics.coco_gts["t2i"]
    package_images = np.array([c2i.get(int(c), [-1])[0] for c in caption_ids])
    disagree = np.flatnonzero(package_images != np.repeat(image_ids, 5))
    if len(disagree):
        j = disagree[0]
        raise InputError(f"{ids_path}: image ids disagree with the eccv_caption test split on {len(disagree)} "
                         f"captions (line {j + 1}: {image_ids[j // 5]} vs {package_images[j]})")
    # Every metric reads at most the top max(#positives, 10) items of a ranking.
    k = max(10, max(len(v) for v in metrics.eccv_gts["i2t"].values()),
            max(len(v) for v in metrics.eccv_gts["t2i"].values()))
    i2t_idx, _, t2i_idx, _ = topk_rankings(sims, k)
    i2t_items = {int(image_ids[i]): caption_ids[row].tolist() for i, row in enumerate(i2t_idx)}
    t2i_items = {int(caption_ids[j]): image_ids[row].tolist() for j, row in enumerate(t2i_idx)}
    scores = metrics.compute_all_metrics(
        i2t_items, t2i_items, target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1",
                                              "cxc_recalls", "coco_5k_recalls"), Ks=(1, 5, 10), verbose=False)
    out = {name: {d: 100.0 * float(v) for d, v in value.items()} for name, value in scores.items()}
    out["caption_ids"] = how
    return out


# ------------------------------------------------------------------------------------------------
# Command line


def format_table(scores, title):
    """The paper's table: R@1 R@5 R@10 medr meanr ASP per direction, and rsum."""
    lines = [title, f"{'':6}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>7}{'meanr':>8}{'ASP':>7}"]
    for d in ("i2t", "t2i"):
        s = scores[d]
        a = "-" if s["asp"] is None else f"{s['asp']:.1f}"
        lines.append(f"{d:6}{s['r1']:7.1f}{s['r5']:7.1f}{s['r10']:7.1f}{s['medr']:7.1f}{s['meanr']:8.1f}{a:>7}")
    lines.append(f"rsum {scores['rsum']:.1f}")
    return "\n".join(lines)


def build_parser():
    p = errors.ArgumentParser(
        description="R@K and ASP of a checkpoint (or two: SGRAF) or of saved similarity matrices.")
    p.add_argument("--model_path", action="append", default=[], help="checkpoint to evaluate")
    p.add_argument("--model_path2", default=None, help="second checkpoint; the two matrices are averaged (SGRAF)")
    p.add_argument("--sims", action="append", default=[],
                   help="saved (n_images, n_captions) .npy to score instead of a model; repeat to average")
    p.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's; required with --sims)")
    p.add_argument("--data_name", default=None, help="with --sims: f30k_precomp, coco_precomp, ...")
    p.add_argument("--vocab_path", default=None,
                   help="folder with {data_name}_vocab.json "
                        "(default: the checkpoint's vocabulary, else its vocab_path)")
    p.add_argument("--split", default="test", help="test, testall (COCO 5K) or dev")
    p.add_argument("--fold5", action="store_true", help="COCO 1K: mean over 5 folds of 1/5 of the images")
    p.add_argument("--save_sims", default=None, help="save the whole (n_images, n_captions) matrix as .npy")
    p.add_argument("--save_ranks", default=None,
                   help="JSON lines file: each query's top-k indices and scores, both directions")
    p.add_argument("--topk", type=int, default=10, help="length of the lists --save_ranks writes")
    p.add_argument("--json", default=None, help="write the metrics (and provenance) to this JSON file")
    p.add_argument("--eccv", action="store_true",
                   help="COCO testall: also ECCV Caption mAP@R / R-P / R@1 and CxC R@K (eccv_caption package)")
    p.add_argument("--ann_root", default=os.path.join("pmrp_com", "coco_ann"),
                   help="with --eccv: folder that may hold captions_val2014.json (caption ids by text)")
    p.add_argument("--batch_size", type=int, default=128, help="encoding batch size")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--shard_size", type=int, default=1000, help="images (and captions) per similarity shard")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; tf32 (CUDA matmuls); bf16 (autocast): encoders and similarity path only, "
                        "scores and ranking stay fp32")
    p.add_argument("--world_size", type=int, default=1,
                   help="score the matrix with K processes (one per GPU, or K CPU processes), gathered on rank 0")
    return p


def relevance_of_split(data_path, data_name, split):
    """SemanticRelevance of a split's captions (dev cut as data.py does) and the captions file's path."""
    import data
    from daa_loss import SemanticRelevance

    captions = data.read_captions(data_path, data_name, split)
    if split == "dev":
        captions = captions[:data.DEV_MAX_CAPTIONS]
    path = os.path.join(data_path, data_name, f"{split}_caps.txt")
    return SemanticRelevance(captions, data.CAPTIONS_PER_IMAGE, path), path


def load_vocab(args, ckpt, opt, path):
    """Vocabulary: --vocab_path, else the checkpoint's word2idx, else the checkpoint's vocab_path.

    A vocabulary file must be the one checkpoint `path` was trained with (checkpoint.check_vocab).
    """
    import checkpoint
    import vocab as vocab_lib

    if args.vocab_path is None and isinstance(ckpt.get("vocab"), dict):
        return vocab_lib.vocab_from_word2idx(ckpt["vocab"], "the checkpoint's vocabulary")
    vocab_path = os.path.join(args.vocab_path or opt.vocab_path, f"{opt.data_name}_vocab.json")
    vocab = vocab_lib.deserialize_vocab(vocab_path)
    checkpoint.check_vocab(ckpt, path, vocab, vocab_path)
    return vocab


def model_sims(args, path, whole):
    """Similarities of one checkpoint on the split: the full matrix (whole), else the 5 fold blocks.

    Returns (matrix or list of 5 blocks, the checkpoint's opt, data_path, the PrecompDataset).
    """
    import checkpoint
    import data

    ckpt = checkpoint.load_checkpoint(path)
    opt = ckpt["opt"]
    data_path = args.data_path or opt.data_path
    vocab = load_vocab(args, ckpt, opt, path)
    model = checkpoint.model_from_checkpoint(ckpt, path, len(vocab))
    image_loader, caption_loader, dataset = data.get_eval_loaders(
        data_path, opt.data_name, args.split, vocab, args.batch_size, args.workers)
    if distributed.rank_and_world()[0] == 0:
        print(f"{path}: {opt.module_name}, epoch {ckpt.get('epoch')}, {args.split}: "
              f"{dataset.n_images} images, {dataset.n_captions} captions")
    blocks = None if whole else [((lo, hi), (5 * lo, 5 * hi)) for lo, hi in fold_bounds(dataset.n_images)]
    device = distributed.process_device(resolve_device(args.device).type, distributed.rank_and_world()[0])
    sims = compute_sims(model, image_loader, caption_loader, args.shard_size, device, blocks, args.precision)
    return sims, opt, data_path, dataset


def save_ranks(sims, k, path):
    """JSON lines, i2t queries first then t2i: {"direction", "query", "topk": [indices], "scores": [...]}.

    i2t: query = image row, indices = caption columns; t2i: query = caption column, indices = image
    rows; descending score, ties by lower index.
    """
    i2t_idx, i2t_sc, t2i_idx, t2i_sc = topk_rankings(sims, k)
    with fileio.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for direction, idx, sc in (("i2t", i2t_idx, i2t_sc), ("t2i", t2i_idx, t2i_sc)):
            for q in range(len(idx)):
                f.write(json.dumps({"direction": direction, "query": q, "topk": idx[q].tolist(),
                                    "scores": [float(s) for s in sc[q]]}) + "\n")


def save_matrix(sims, path):
    """np.save atomically (a killed run never leaves a truncated .npy)."""
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, sims)


def evaluation_rank(rank, args, argv, init_method, device_type):
    """A process started by --world_size: score this rank's share of the matrix for rank 0, then leave.

    An error here is also rank 0's error (same inputs), which rank 0 reports; this process just exits.
    """
    distributed.init_group(rank, args.world_size, init_method, device_type)
    try:
        evaluate(args, argv)
    except InputError:
        sys.exit(2)
    finally:
        dist.destroy_process_group()


def evaluate_spawned(args, argv):
    """--world_size K: this process is rank 0 and starts ranks 1..K-1; rank 0 gathers and reports."""
    device_type = resolve_device(args.device).type
    if device_type == "cuda" and args.world_size > torch.cuda.device_count():
        raise InputError(f"--world_size {args.world_size}: only {torch.cuda.device_count()} CUDA device(s) available")
    init_method = f"tcp://127.0.0.1:{distributed.free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    workers = [context.Process(target=evaluation_rank, args=(rank, args, argv, init_method, device_type),
                               daemon=True) for rank in range(1, args.world_size)]
    for worker in workers:
        worker.start()
    threads = torch.get_num_threads()  # init_group shares the CPU threads out; give them back afterwards
    distributed.init_group(0, args.world_size, init_method, device_type)
    try:
        report = evaluate(args, argv)
    except (RuntimeError, dist.DistBackendError) as err:
        for worker in workers:
            worker.terminate()
        raise InputError(f"an evaluation process failed ({str(err).strip().splitlines()[0][:200]})") from None
    except BaseException:
        for worker in workers:  # they would wait for rank 0 in the gather until the group's timeout
            worker.terminate()
        raise
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    for worker in workers:
        worker.join()
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    if bool(model_paths) == bool(args.sims):
        raise InputError("give either --model_path (and optionally --model_path2) or --sims, not both or neither")
    if args.eccv and (args.fold5 or args.split != "testall"):
        raise InputError("--eccv scores the whole COCO testall split: use --split testall without --fold5")
    if args.topk < 1 or args.shard_size < 1 or args.world_size < 1:
        raise InputError("--topk, --shard_size and --world_size must be positive")
    if args.sims and args.world_size > 1:
        raise InputError("--world_size splits the scoring of a model; --sims matrices are already scored")
    for output in (args.json, args.save_sims, args.save_ranks):
        if output:
            fileio.check_output(output)
    if distributed.launched_by_torchrun():
        distributed.init_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://",
                               resolve_device(args.device).type)
        try:
            return evaluate(args, argv)
        finally:
            dist.destroy_process_group()
    if args.world_size > 1:
        return evaluate_spawned(args, argv)
    return evaluate(args, argv)


def evaluate(args, argv):
    """Everything main does once the processes are set up; ranks other than 0 return None."""
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    relevance = None
    if args.sims:
        if not (args.data_path and args.data_name):
            raise InputError("--sims needs --data_path and --data_name (the split's captions give ASP)")
        relevance, caps_path = relevance_of_split(args.data_path, args.data_name, args.split)
        sims = load_sims(args.sims, relevance.n_captions, caps_path)
        data_path, data_name, opts_used, blocks = args.data_path, args.data_name, None, None
    else:
        # --fold5 alone scores only the five diagonal blocks; the rest of the matrix is never needed.
        whole = not args.fold5 or bool(args.save_sims or args.save_ranks or args.eccv)
        results, opts_used = [], []
        for path in model_paths:
            out, opt, data_path, dataset = model_sims(args, path, whole)
            results.append(out)
            opts_used.append(opt)
        if distributed.rank_and_world()[0] != 0:
            return None
        data_name = opts_used[0].data_name
        if any(o.data_name != data_name for o in opts_used):
            raise InputError(f"{model_paths[1]}: trained on {opts_used[1].data_name}, "
                             f"but {model_paths[0]} on {data_name}")
        relevance = dataset.relevance
        if whole:
            sims = results[0] if len(results) == 1 else sum(results) / len(results)
            blocks = None
        else:
            sims = None
            blocks = [sum(b) / len(b) for b in zip(*results)]
    if args.save_sims:
        save_matrix(sims, args.save_sims)
        print(f"saved the {sims.shape} similarity matrix to {args.save_sims}")
    if args.save_ranks:
        save_ranks(sims, args.topk, args.save_ranks)

    n_images = relevance.n_images
    report = {"split": args.split, "fold5": bool(args.fold5), "n_images": n_images,
              "n_captions": relevance.n_captions}
    if args.fold5:
        bounds = fold_bounds(n_images)
        if blocks is None:
            blocks = [sims[lo:hi, 5 * lo:5 * hi] for lo, hi in bounds]
        fold_scores = [score_matrix(b, relevance.block(np.arange(lo, hi), np.arange(5 * lo, 5 * hi)))
                       for b, (lo, hi) in zip(blocks, bounds)]
        report.update(mean_scores(fold_scores))
        for f, s in enumerate(fold_scores):
            print(format_table(s, f"fold {f}"))
        print(format_table(report, f"{args.split}: mean of 5 folds (1K)"))
        if sims is not None:
            report["all"] = score_matrix(sims, relevance.matrix())
            print(format_table(report["all"], f"{args.split}: all {n_images} images"))
    else:
        report.update(score_matrix(sims, relevance.matrix()))
        print(format_table(report, f"{args.split}: {n_images} images"))
    if args.eccv:
        report["eccv"] = eccv_scores(sims, data_path, data_name, args.split, args.ann_root)
        print(json.dumps(report["eccv"], indent=2))
    if args.json:
        report["provenance"] = provenance(
            argv, checkpoint=model_paths or None, sims=args.sims or args.save_sims,
            opt=[vars(o) for o in opts_used] if opts_used else None, data_path=data_path, data_name=data_name)
        fileio.write_json(report, args.json)
    return report


if __name__ == "__main__":
    sys.exit(errors.run(main))
