"""Evaluation: R@K (SCAN convention), ASP, from a checkpoint or from saved similarity matrices.

    python evaluation.py --model_path CKPT [--model_path2 CKPT2] [--split testall] [--fold5]
                         [--save_sims S.npy] [--save_ranks F --topk 10] [--json OUT] [--eccv]
    python evaluation.py --sims S.npy [--sims S2.npy ...] --data_path D --data_name N --split S
                         [--fold5] --json OUT
    python evaluation.py --model_path CKPT [--model_path2 CKPT2] --shortlist EMB_CKPT --shortlist_k K [--fold5]

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

--shortlist: two-stage retrieval. Per query, the K best gallery items by the shortlist model (ties by
lower index) are scored by the main model(s) and ranked above all others, in the main model's order;
the others follow in the shortlist model's order (in a fold: the fold's gallery). Only those pairs are
scored; R@K and ASP are those of the two rankings (i2t and t2i differ), K >= the gallery = plain scoring.
"""
import concurrent.futures
import contextlib
import ctypes
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import distributed
import errors
import fileio
import vocab as vocab_lib
from daa_loss import SemanticRelevance
from errors import InputError
from layout import CAPTIONS_PER_IMAGE, dataset_dir, fold_bounds
from model import SimilarityModel
from pmrp_com.eccv import eccv_metrics, eccv_scores
from pmrp_com.pmrp import topk_rankings, topk_rows

# Elements of one chunk of rows in the rank computations: 2^20 x (1-8 bytes) x about 15 temporaries.
CHUNK_ELEMENTS = 1 << 20
KS = (1, 5, 10)
# How a PCME (PCME++) checkpoint's matrix is scored (model.PCMEHead, PCMEppHead in eval mode), told in the JSON
# of its evaluations.
PCME_SCORING = "means: sigmoid(-a ||mu_image - mu_caption||_2 + b)"
PCMEPP_SCORING = "-CSD: -(||mu_image - mu_caption||^2 + sum sigma_image^2 + sum sigma_caption^2)"
SCORING = {"PCME": PCME_SCORING, "PCMEpp": PCMEPP_SCORING}


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


def _twice_ranks(x, ties):
    """Twice the descending rank of every item of each row of x (b, n): int64 (b, n), exact integers.

    ties "last": 1 + #{a != c : x[a] >= x[c]} (a tied item ranks after everything it ties with);
    ties "average": 1 + #{a : x[a] > x[c]} + 1/2 #{a != c : x[a] = x[c]}. In ascending order a block of
    equal values spans positions first..last: #{x[a] < x[c]} = first, #{x[a] <= x[c]} = last + 1.
    """
    n = x.shape[1]
    order, values = _sort_rows(x)
    first, last = _tie_bounds(values)
    in_order = 2 * (n - first) if ties == "last" else 2 * n - first - last
    ranks = np.empty(x.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, in_order, axis=1)
    return ranks


def _asp_rows(s, r):
    """Sum over the rows of s and r (b, n) of min(rank_s, rank_r) / max(rank_s, rank_r) (a float)."""
    rank_s, rank_r = _twice_ranks(s, "last"), _twice_ranks(r, "average")
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


def score_matrix(sims, sems=None, t2i_sims=None):
    """{"i2t": {r1, r5, r10, medr, meanr, asp}, "t2i": {...}, "rsum"} of one (n, 5n) block.

    t2i_sims: the block whose columns rank the caption queries when it is not `sims` (two-stage
    retrieval ranks the two directions from different candidates).
    """
    out = {"i2t": _direction(i2t(sims, sems)), "t2i": _direction(t2i(sims if t2i_sims is None else t2i_sims, sems))}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def fold_blocks(matrix):
    """The diagonal (n / 5, n) fold blocks of an (n_images, 5 n_images) matrix: each fold's images x captions."""
    return [matrix[lo:hi, 5 * lo:5 * hi] for lo, hi in fold_bounds(matrix.shape[0])]


def score_folds(blocks, sems_blocks=None, t2i_blocks=None):
    """COCO 1K: score_matrix of each fold block, their mean at the top level, and the list under "folds".

    blocks: the 5 fold blocks of S; sems_blocks: the same blocks of M (asp stays None without them);
    t2i_blocks: score_matrix's t2i_sims of each fold.
    """
    folds = [score_matrix(b, m, t) for b, m, t in zip(blocks, sems_blocks or [None] * len(blocks),
                                                       t2i_blocks or [None] * len(blocks))]
    out = {d: {key: (None if folds[0][d][key] is None else float(np.mean([f[d][key] for f in folds])))
               for key in folds[0][d]} for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([f["rsum"] for f in folds]))
    out["folds"] = folds
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
    batch padded only to its own longest caption. Embedding models (VSE, PCME, PCMEpp) give one row per item:
    img_embs (n_img, ...) and a single entry (0, all captions' embeddings (n_cap, ...), lengths).
    """
    model.eval()
    img_embs = []
    for images, _ in tqdm(image_loader, desc="encode images", leave=False, disable=None):
        img_embs.append(model.encode_images(images.to(device, non_blocking=True)).float().cpu())
    captions, start = [], 0
    for caps, lengths, _ in tqdm(caption_loader, desc="encode captions", leave=False, disable=None):
        # lengths stay on the CPU, where the text encoder packs by them (a GPU copy came straight back)
        captions.append((start, model.encode_captions(caps.to(device, non_blocking=True), lengths).float().cpu(),
                         lengths))
        start += len(lengths)
    if model.embedding and captions:
        captions = [(0, torch.cat([c[1] for c in captions]), torch.cat([c[2] for c in captions]))]
    return torch.cat(img_embs), captions


def _caption_slice(captions, lo, hi, rows=False):
    """Embeddings (hi - lo, L, d) and lengths of captions lo..hi-1, padded to their longest; with `rows`
    (an embedding model's single entry of one row per caption, see `encode`), rows lo..hi-1 as they are."""
    if rows:
        _, embs, lengths = captions[0]
        return embs[lo:hi], lengths[lo:hi]
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
            embs, lengths = _caption_slice(captions, c, min(c + shard_size, c1), model.embedding)
            sims = model.similarity(imgs, embs.to(device), lengths)  # lengths on the CPU: chunks are planned there
            out[a - i0:a - i0 + len(imgs), c - c0:c - c0 + len(lengths)] = sims.float().cpu().numpy()
            if bar is not None:
                bar.update(len(imgs) * len(lengths))
    return out


PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision(name, device):
    """Numerics of the encoders and the similarity path; the score head and all ranking stay fp32.

    fp32: exact, cuDNN's GRU included (PyTorch lets cuDNN use TF32 by default, on Ampere and later GPUs).
    tf32: TF32 tensor-core matmuls and cuDNN on CUDA (no effect on a CPU). bf16: autocast to bfloat16
    (on CUDA, and on CPUs with bf16 support). The caller's settings come back afterwards.
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} (got {name!r})")
    previous, previous_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    if name == "tf32":
        torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cudnn.allow_tf32 = previous_cudnn


def release_freed_memory():
    """Hand the memory the C allocator keeps after frees back to the OS (glibc's malloc_trim; a no-op where
    it is missing). The encoders' batch buffers, freed after encoding, would otherwise stay in the process
    beside the score matrix (COCO 5K with an embedding model: the peak was 1.08 GB, over two matrices)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        release_freed_memory()
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
# Two-stage retrieval (--shortlist): a shortlist model picks each query's candidates, the main model
# ranks them. Per query, its top k gallery items by the shortlist model come first, in the main
# model's order; every other item follows in the shortlist model's order.


def shortlist_masks(shortlist, k):
    """The candidates of every query: two bool (n_img, n_cap) masks, i2t (each image row's top k captions)
    and t2i (each caption column's top k images), by the shortlist scores `shortlist` (n_img, n_cap),
    ties by lower index (pmrp_com.pmrp.topk_rows, the rule of --save_ranks). k >= the gallery: all."""
    i2t_mask = np.zeros(shortlist.shape, dtype=bool)
    np.put_along_axis(i2t_mask, topk_rows(shortlist, k), True, axis=1)
    t2i_mask = np.zeros(shortlist.shape[::-1], dtype=bool)
    np.put_along_axis(t2i_mask, topk_rows(shortlist.T, k), True, axis=1)
    return i2t_mask, t2i_mask.T


def two_stage_values(shortlist, scores, chosen):
    """The two-stage ranking of each query row as values: float32 (n_q, n), higher ranks first.

    shortlist (n_q, n): the shortlist model's scores; chosen (n_q, n) bool: each row's candidates, the
    same number k in every row; scores (n_q, n): the main model's, read where chosen only (views fine).
    Value of item c = the number of items ranked strictly below it: (n - k) + #{a chosen : scores[a] <
    scores[c]} for a candidate, #{a : shortlist[a] < shortlist[c]} for any other (the candidates are
    the row's top, none of them below it). Items tie exactly where the deciding model ties them, so R@K
    and ASP of these values are those of the ranking; integers under 2^24, exact in float32.
    """
    n_q, n = shortlist.shape
    k = int(chosen[0].sum()) if n_q else 0
    values = np.empty((n_q, n), dtype=np.float32)
    for rows in _chunks(n_q, n):
        picked = np.ascontiguousarray(chosen[rows])
        # 1 + #{a != c : x[a] >= x[c]} = half of _twice_ranks "last": n minus it = #{a : x[a] < x[c]}
        below = n - _twice_ranks(np.ascontiguousarray(shortlist[rows]), "last") // 2
        candidates = np.ascontiguousarray(scores[rows])[picked].reshape(-1, k)  # row by row, k each
        below[picked] = (n - _twice_ranks(candidates, "last") // 2).ravel()  # (n - k) + (k - rank)
        values[rows] = below
    return values


def pack_captions(captions):
    """encode's caption batches as one tensor of real words: words (n_words, d), and per caption its
    first word's row and its length, int64 (n_cap,) each."""
    lengths = torch.cat([lens for _, _, lens in captions]).long()
    words = torch.cat([embs[torch.arange(embs.shape[1]) < lens[:, None]] for _, embs, lens in captions])
    return words, torch.cumsum(lengths, 0) - lengths, lengths


def gather_captions(packed, ids):
    """Captions `ids` (int64 (m,)) of pack_captions' `packed`, zero-padded to their longest: embeddings
    (m, L, d) and lengths (m,), what _caption_slice gives for a range of captions."""
    words, firsts, lengths = packed
    ids = torch.as_tensor(ids)
    lens = lengths[ids]
    position = torch.arange(int(lens.max()))
    real = position < lens[:, None]  # (m, L)
    rows = torch.where(real, firsts[ids, None] + position, 0)
    return torch.where(real[..., None], words[rows], 0.0), lens


@torch.no_grad()
def similarity_pairs(model, img_embs, packed, ranges, needed, shard_size, device, bar=None):
    """Scores of the marked pairs only: a float32 (i1 - i0, c1 - c0) matrix per block, 0 where a pair is
    not needed. img_embs (n_img, R, d) and `packed` captions (pack_captions) as encoded.

    ranges: ((i0, i1), (c0, c1)) per block (as compute_sims' `blocks`); needed: bool, one per block.
    In similarity_block's shards, a shard whose every pair is needed is scored in one call with the same
    inputs as there (so a shortlist of the whole gallery gives plain evaluation's scores bit for bit);
    then every image with needed pairs left is scored in one call with all the captions it needs.
    """
    def scores_of(images, ids):
        embs, lengths = gather_captions(packed, ids)
        return model.similarity(images.to(device), embs.to(device), lengths).float().cpu().numpy()

    out = []
    for ((i0, i1), (c0, c1)), need in zip(ranges, needed):
        block, left = np.zeros(need.shape, dtype=np.float32), need.copy()
        for a in range(0, i1 - i0, shard_size):
            rows = slice(a, min(a + shard_size, i1 - i0))
            for c in range(0, c1 - c0, shard_size):
                cols = slice(c, min(c + shard_size, c1 - c0))
                if need[rows, cols].all():
                    block[rows, cols] = scores_of(img_embs[i0 + rows.start:i0 + rows.stop],
                                                  c0 + np.arange(cols.start, cols.stop))
                    left[rows, cols] = False
                    if bar is not None:
                        bar.update(block[rows, cols].size)
            for i in range(rows.start, rows.stop):
                columns = np.flatnonzero(left[i])
                if len(columns):
                    block[i, columns] = scores_of(img_embs[i0 + i:i0 + i + 1], c0 + columns)[0]
                    if bar is not None:
                        bar.update(len(columns))
        out.append(block)
    return out


def score_pairs(model, image_loader, caption_loader, ranges, needed, shard_size=1000, device=None,
                precision_name="fp32"):
    """similarity_pairs of a model on the split: images and captions encoded once (as compute_sims)."""
    device = resolve_device(device)
    model.to(device).eval()
    with precision(precision_name, device):
        img_embs, captions = encode(model, image_loader, caption_loader, device)
        packed = pack_captions(captions)
        del captions  # the packed words replace the padded batches
        with tqdm(total=int(sum(m.sum() for m in needed)), desc="shortlisted pairs", unit="pair", unit_scale=True,
                  disable=None) as bar:
            return similarity_pairs(model, img_embs, packed, ranges, needed, shard_size, device, bar)


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
    p.add_argument("--model_path2", default=None,
                   help="second checkpoint of another module (SGR + SAF: SGRAF); the two matrices are averaged")
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
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default, one per core; K CPU processes get cores/K "
                        "each); 1 on a machine shared with other jobs. Scores can differ in the last bits "
                        "with the thread count")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; tf32 (CUDA matmuls); bf16 (autocast): encoders and similarity path only, "
                        "scores and ranking stay fp32")
    p.add_argument("--shortlist", default=None,
                   help="two-stage retrieval: this checkpoint picks each query's --shortlist_k candidates, which "
                        "--model_path (and --model_path2) score and rank above all others")
    p.add_argument("--shortlist_k", type=int, default=None, help="candidates per query with --shortlist")
    p.add_argument("--world_size", type=int, default=1,
                   help="score the matrix with K processes (one per GPU, or K CPU processes), gathered on rank 0")
    return p


def relevance_of_split(data_path, data_name, split):
    """SemanticRelevance of a split's captions (dev cut as data.py does) and the captions file's path."""
    captions = data.used_captions(data.read_captions(data_path, data_name, split), split)
    path = os.path.join(data_path, data_name, f"{split}_caps.txt")
    return SemanticRelevance(captions, CAPTIONS_PER_IMAGE, path), path


def load_vocab(args, ckpt, opt, path):
    """Vocabulary: --vocab_path, else the checkpoint's word2idx, else the checkpoint's vocab_path.

    A vocabulary file must be the one checkpoint `path` was trained with (checkpoint.check_vocab).
    """
    if args.vocab_path is None and isinstance(ckpt.get("vocab"), dict):
        return vocab_lib.vocab_from_word2idx(ckpt["vocab"], "the checkpoint's vocabulary")
    vocab_path = os.path.join(args.vocab_path or opt.vocab_path, f"{opt.data_name}_vocab.json")
    vocab = vocab_lib.deserialize_vocab(vocab_path)
    checkpoint.check_vocab(ckpt, path, vocab, vocab_path)
    return vocab


def load_for_scoring(args, path):
    """A checkpoint's model (eval mode), its opt, data_path, the split's image and caption loaders, the
    PrecompDataset and the device to score on; the vocabulary and features are checked against it."""
    ckpt = checkpoint.load_checkpoint(path)
    opt = ckpt["opt"]
    data_path = args.data_path or opt.data_path
    vocab = load_vocab(args, ckpt, opt, path)
    model = SimilarityModel.from_checkpoint(ckpt, path, len(vocab))
    device = distributed.process_device(resolve_device(args.device).type, distributed.rank_and_world()[0])
    image_loader, caption_loader, dataset = data.get_eval_loaders(
        data_path, opt.data_name, args.split, vocab, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    data.check_features(dataset.features, opt.img_dim, f"the model of {path}")
    if distributed.rank_and_world()[0] == 0:
        print(f"{path}: {opt.module_name}, epoch {ckpt.get('epoch')}, {args.split}: "
              f"{dataset.n_images} images, {dataset.n_captions} captions")
    return model, opt, data_path, image_loader, caption_loader, dataset, device


def model_sims(args, path, whole):
    """Similarities of one checkpoint on the split: the full matrix (whole), else the 5 fold blocks.

    Returns (matrix or list of 5 blocks, the checkpoint's opt, data_path, the PrecompDataset).
    """
    model, opt, data_path, image_loader, caption_loader, dataset, device = load_for_scoring(args, path)
    blocks = None if whole else fold_ranges(dataset.n_images)
    sims = compute_sims(model, image_loader, caption_loader, args.shard_size, device, blocks, args.precision)
    return sims, opt, data_path, dataset


def fold_ranges(n_images):
    """((first image, end), (first caption, end)) of each of the 5 folds."""
    return [((lo, hi), (5 * lo, 5 * hi)) for lo, hi in fold_bounds(n_images)]


def two_stage(args, model_paths):
    """--shortlist: the shortlist model's matrix (or fold blocks), each query's top --shortlist_k
    candidates in it, the main models' scores of those pairs (an SGRAF pair averaged as plain evaluation
    does) and the two rankings as two_stage_values.

    Returns (i2t values, t2i values: one (n_img, n_cap) matrix each, or 5 fold blocks with --fold5; the
    t2i ones are transposed views), the main models' opts, data_path, dataset, the "shortlist" report.
    """
    started = time.perf_counter()
    shortlist, shortlist_opt, _, dataset = model_sims(args, args.shortlist, whole=not args.fold5)
    shortlist = shortlist if args.fold5 else [shortlist]
    shortlist_seconds = time.perf_counter() - started
    ranges = fold_ranges(dataset.n_images) if args.fold5 else [((0, dataset.n_images), (0, dataset.n_captions))]
    masks = [shortlist_masks(block, args.shortlist_k) for block in shortlist]
    needed = [i2t_mask | t2i_mask for i2t_mask, t2i_mask in masks]
    started = time.perf_counter()
    results, opts_used = [], []
    for path in model_paths:
        model, opt, data_path, image_loader, caption_loader, dataset, device = load_for_scoring(args, path)
        results.append(score_pairs(model, image_loader, caption_loader, ranges, needed, args.shard_size, device,
                                   args.precision))
        opts_used.append(opt)
    scores = [sum(blocks) / len(blocks) for blocks in zip(*results)]
    del results  # each model's scores: only their mean is ranked
    report = {"checkpoint": args.shortlist, "module_name": shortlist_opt.module_name, "k": args.shortlist_k,
              "pairs_scored": int(sum(m.sum() for m in needed)),
              "pairs_total": int(sum((i1 - i0) * (c1 - c0) for (i0, i1), (c0, c1) in ranges)),
              "shortlist_seconds": shortlist_seconds, "scoring_seconds": time.perf_counter() - started}
    print(f"shortlist {args.shortlist} ({shortlist_opt.module_name}): top {args.shortlist_k} per query, "
          f"{report['pairs_scored']:,} of {report['pairs_total']:,} pairs scored by each of {len(model_paths)} "
          f"model(s); shortlist {shortlist_seconds:.1f} s, scoring {report['scoring_seconds']:.1f} s")
    i2t_values = [two_stage_values(block, s, i2t_mask) for block, s, (i2t_mask, _) in zip(shortlist, scores, masks)]
    t2i_values = [two_stage_values(block.T, s.T, t2i_mask.T).T
                  for block, s, (_, t2i_mask) in zip(shortlist, scores, masks)]
    return i2t_values, t2i_values, opts_used, data_path, dataset, report


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


def describe(err):
    """One line for an exception: an InputError's message, else its type and first line."""
    if isinstance(err, InputError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def evaluation_rank(rank, args, argv, init_method, device_type, failures):
    """A process started by --world_size: score this rank's share of the matrix for rank 0, then leave.

    Rank 0 would see only that a peer is gone ("Connection closed by peer"), so this process puts the
    cause of its failure on `failures` (a queue) as one line for rank 0 to report, and exits with 2.
    """
    try:
        distributed.init_group(rank, args.world_size, init_method, device_type, threads=args.threads)
        evaluate(args, argv)
    except BaseException as err:
        failures.put(f"rank {rank}: {describe(err)}")
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def end_ranks(workers, failures, wait_s=10.0):
    """End the spawned ranks after rank 0 failed; returns the first failure one of them reported, or None.

    A rank that failed first reports and exits at once: it is waited for up to `wait_s` seconds (the ones
    still running wait for rank 0 in a collective, until the group's timeout, and are terminated).
    """
    deadline = time.monotonic() + wait_s
    while failures.empty() and any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in workers:
        worker.terminate()
        worker.join()
    return None if failures.empty() else failures.get()


def evaluate_spawned(args, argv):
    """--world_size K: this process is rank 0 and starts ranks 1..K-1; rank 0 gathers and reports.

    The ranks are not daemon processes: a daemon cannot start children, i.e. data loader workers
    (--workers > 0). Every way out of here ends them, so none outlives rank 0.
    """
    device_type = resolve_device(args.device).type
    distributed.check_world_size(args.world_size, device_type)
    init_method = f"tcp://127.0.0.1:{distributed.free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    failures = context.SimpleQueue()
    workers = [context.Process(target=evaluation_rank, args=(rank, args, argv, init_method, device_type, failures))
               for rank in range(1, args.world_size)]
    for worker in workers:
        worker.start()
    try:
        distributed.init_group(0, args.world_size, init_method, device_type, threads=args.threads)
        report = evaluate(args, argv)
    except (RuntimeError, dist.DistBackendError) as err:
        cause = end_ranks(workers, failures) or f"rank 0: {describe(err)}"
        raise InputError(f"an evaluation process failed: {cause}") from None
    except BaseException:
        end_ranks(workers, failures, wait_s=0)  # they would wait for rank 0 in the gather until the group's timeout
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for worker in workers:
        worker.join()
    return report


def check_before_scoring(args, model_paths):
    """What can be checked from the checkpoints' options and the caption files, before a matrix is scored
    (hours for COCO 5K): the dataset folder (with a suggestion for a near-miss name), an ensemble pair (two
    models of different modules, e.g. SGR + SAF = SGRAF, of one dataset), and the split --eccv needs."""
    if model_paths:
        options = [checkpoint.load_checkpoint(path)["opt"] for path in model_paths]
        data_path, data_name = args.data_path or options[0].data_path, options[0].data_name
        if len(options) == 2 and options[1].data_name != data_name:
            raise InputError(f"{model_paths[1]}: trained on {options[1].data_name}, but {model_paths[0]} on "
                             f"{data_name}; an ensemble pair scores one dataset")
        if len(options) == 2 and options[1].module_name == options[0].module_name:
            raise InputError(f"{model_paths[1]}: an {options[1].module_name} model like {model_paths[0]}; an "
                             f"ensemble pair averages two modules, e.g. SGR + SAF (average two runs of one module "
                             f"with --sims)")
    else:
        data_path, data_name = args.data_path, args.data_name
    dataset_dir(data_path, data_name)
    if args.eccv:
        eccv_metrics(len(data.read_captions(data_path, data_name, args.split)), data_name, args.split)


def check_shortlist(args, model_paths):
    """--shortlist: its checkpoint must rank the main model's dataset, with the same features and
    vocabulary (checked before anything is scored)."""
    shortlist_ckpt, main_ckpt = checkpoint.load_checkpoint(args.shortlist), checkpoint.load_checkpoint(model_paths[0])
    shortlist_opt, main_opt = shortlist_ckpt["opt"], main_ckpt["opt"]
    if shortlist_opt.data_name != main_opt.data_name:
        raise InputError(f"{args.shortlist}: a shortlist model of {shortlist_opt.data_name}, but {model_paths[0]} "
                         f"was trained on {main_opt.data_name}; both must rank one dataset")
    if shortlist_opt.img_dim != main_opt.img_dim:
        raise InputError(f"{args.shortlist}: a shortlist model of {shortlist_opt.img_dim}-dim features, but "
                         f"{model_paths[0]} reads {main_opt.img_dim}-dim ones; both must rank one dataset")
    shortlist_vocab = load_vocab(args, shortlist_ckpt, shortlist_opt, args.shortlist)
    main_vocab = load_vocab(args, main_ckpt, main_opt, model_paths[0])
    if shortlist_vocab.word2idx != main_vocab.word2idx:
        raise InputError(f"{args.shortlist}: its vocabulary ({len(shortlist_vocab)} words) is not the one of "
                         f"{model_paths[0]} ({len(main_vocab)} words); a shortlist model must be trained on the "
                         f"same dataset and vocabulary")


def main(argv=None):
    args = build_parser().parse_args(argv)
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    if bool(model_paths) == bool(args.sims):
        raise InputError("give either --model_path (and optionally --model_path2) or --sims, not both or neither")
    if args.sims and not (args.data_path and args.data_name):
        raise InputError("--sims needs --data_path and --data_name (the split's captions give ASP)")
    if args.eccv and (args.fold5 or args.split != "testall"):
        raise InputError("--eccv scores the whole COCO testall split: use --split testall without --fold5")
    if args.topk < 1 or args.shard_size < 1 or args.world_size < 1 or args.threads < 0:
        raise InputError("--topk, --shard_size and --world_size must be positive, --threads not negative")
    if args.sims and args.world_size > 1:
        raise InputError("--world_size splits the scoring of a model; --sims matrices are already scored")
    if (args.shortlist is None) != (args.shortlist_k is None):
        raise InputError("--shortlist CKPT and --shortlist_k K go together (two-stage retrieval)")
    if args.shortlist is not None:
        if args.shortlist_k < 1:
            raise InputError(f"--shortlist_k must be at least 1 (candidates per query), got {args.shortlist_k}")
        if args.sims:
            raise InputError("--shortlist re-scores a model's candidates with --model_path; --sims matrices have "
                             "no model to re-score them")
        if args.save_sims or args.save_ranks or args.eccv:
            raise InputError("--save_sims, --save_ranks and --eccv need one similarity matrix; --shortlist ranks "
                             "the two directions from different candidates and scores only those")
        if args.world_size > 1 or distributed.launched_by_torchrun():
            raise InputError("--shortlist runs in one process (--world_size and torchrun split a full matrix)")
    for output in (args.json, args.save_sims, args.save_ranks):
        if output:
            fileio.check_output(output)
    check_before_scoring(args, model_paths)
    if args.shortlist:
        check_shortlist(args, model_paths)
    threads = torch.get_num_threads()  # --threads is this evaluation's: an in-process caller keeps its own
    try:
        if distributed.launched_by_torchrun():
            distributed.init_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://",
                                   resolve_device(args.device).type, threads=args.threads)
            try:
                return evaluate(args, argv)
            finally:
                dist.destroy_process_group()
        if args.world_size > 1:
            return evaluate_spawned(args, argv)
        distributed.set_threads(args.threads)
        return evaluate(args, argv)
    finally:
        torch.set_num_threads(threads)


def evaluate(args, argv):
    """Everything main does once the processes are set up; ranks other than 0 return None."""
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    relevance, t2i_sims, t2i_blocks, shortlist = None, None, None, None
    if args.shortlist:
        i2t_values, t2i_values, opts_used, data_path, dataset, shortlist = two_stage(args, model_paths)
        data_name, relevance = opts_used[0].data_name, dataset.relevance
        if args.fold5:
            sims, blocks, t2i_blocks = None, i2t_values, t2i_values
        else:
            (sims,), (t2i_sims,), blocks = i2t_values, t2i_values, None
    elif args.sims:
        relevance, caps_path = relevance_of_split(args.data_path, args.data_name, args.split)
        sims = fileio.load_sims(args.sims, relevance.n_captions, caps_path)
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
        relevance = dataset.relevance
        if whole:
            sims = results[0] if len(results) == 1 else sum(results) / len(results)
            blocks = None
        else:
            sims = None
            blocks = [sum(b) / len(b) for b in zip(*results)]
    if args.save_sims:
        fileio.save_npy(sims, args.save_sims)
        print(f"saved the {sims.shape} similarity matrix to {args.save_sims}")
    if args.save_ranks:
        save_ranks(sims, args.topk, args.save_ranks)

    n_images = relevance.n_images
    report = {"split": args.split, "fold5": bool(args.fold5), "n_images": n_images,
              "n_captions": relevance.n_captions}
    scoring = dict.fromkeys(SCORING[o.module_name] for o in opts_used or () if o.module_name in SCORING)
    if scoring:
        report["pcme_scoring"] = "; ".join(scoring)
    if args.fold5:
        sems_blocks = [relevance.block(np.arange(lo, hi), np.arange(5 * lo, 5 * hi)) for lo, hi in fold_bounds(n_images)]
        report.update(score_folds(fold_blocks(sims) if blocks is None else blocks, sems_blocks, t2i_blocks))
        for f, s in enumerate(report["folds"]):
            print(format_table(s, f"{data_name} {args.split} fold {f}"))
        print(format_table(report, f"{data_name} {args.split}: mean of 5 folds (1K)"))
        if sims is not None:
            report["all"] = score_matrix(sims, relevance.matrix())
            print(format_table(report["all"], f"{data_name} {args.split}: all {n_images} images"))
    else:
        report.update(score_matrix(sims, relevance.matrix(), t2i_sims))
        print(format_table(report, f"{data_name} {args.split}: {n_images} images"))
    if shortlist:
        report["shortlist"] = shortlist
    if args.eccv:
        report["eccv"] = eccv_scores(sims, data_path, data_name, args.split, args.ann_root)
        print(json.dumps(report["eccv"], indent=2))
    if args.json:
        report["provenance"] = fileio.provenance(
            argv, checkpoint=model_paths or None, sims=args.sims or args.save_sims,
            opt=[vars(o) for o in opts_used] if opts_used else None, data_path=data_path, data_name=data_name)
        fileio.write_json(report, args.json)
    return report


if __name__ == "__main__":
    sys.exit(errors.run(main))
