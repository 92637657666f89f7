"""R@K (SCAN convention), medr, meanr and ASP of similarity scores, per chunk of query rows: numpy only.

S is (n_images, n_captions) = (n, 5n), rows in image order, columns in caption order; captions
5i..5i+4 belong to image i. Every metric is per query, so each direction is computed from chunks of
its own query rows: i2t from rows of S (image i over every caption) and of the relevance M, t2i from
rows of S^T and M^T (caption j over every image). A whole matrix is one chunk (`score_matrix`); a
streamed evaluation hands in chunks as they are scored (`score_chunks`): both run the same per-chunk
code (`i2t_part`, `t2i_part`), so they give the same ranks, and ASP sums that differ only in the order
of the float additions of the chunks' sums.

R@K. i2t: rank of image i = min over its captions c of #{distractors a : s[i, a] >= s[i, c]} (its other
captions never count against c); t2i: rank of caption j = #{a != j // 5 : s[a, j] >= s[j // 5, j]}. Ties
with a distractor count against the query, so a constant matrix gets R@1 = 0 and no value depends on
a sort order. Computed by comparisons in chunks of rows (or columns), no sorting.

ASP: for each query row, rank_s(c) = 1 + #{a != c : s[a] >= s[c]} (a tied score ranks after everything
it ties with: a model earns no credit for the ties it makes, so a constant matrix scores about 50, like
random scores) and rank_r(c) = 1 + #{a : r[a] > r[c]} + 1/2 #{a != c : r[a] = r[c]} on the relevance M
(equal relevance is genuine: the average rank of a tied block); ASP = 100 mean min(rank_s, rank_r) /
max(...).
"""
import concurrent.futures
import os
import sys

import numpy as np

from layout import fold_bounds

# Elements of one chunk of rows in the rank computations: 2^20 x (1-8 bytes) x about 15 temporaries.
CHUNK_ELEMENTS = 1 << 20
KS = (1, 5, 10)
KEYS = ("r1", "r5", "r10", "medr", "meanr", "asp")


def _chunks(n, length):
    """Slices of at most CHUNK_ELEMENTS // length rows covering range(n)."""
    step = max(1, CHUNK_ELEMENTS // max(1, length))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _threads():
    """Threads for ASP's sorts: the count the caller gave torch (--threads) when torch is loaded, else one
    per core. Read, not imported: this module stays numpy only."""
    torch = sys.modules.get("torch")
    return max(1, torch.get_num_threads() if torch is not None else (os.cpu_count() or 1))


def _check_gallery(n_queries, first, n_gallery, per_query):
    """The queries first..first+n_queries-1 must have their ground truth inside the gallery."""
    if per_query == 5 and n_gallery < 5 * (first + n_queries) or per_query == 1 and n_gallery * 5 < first + n_queries:
        raise ValueError(f"queries {first}..{first + n_queries - 1} have no ground truth among {n_gallery} items "
                         f"(expected an (n_images, 5 n_images) matrix)")


def _whole_or_part(sims, first):
    """first None: `sims` must be a whole (n, 5n) matrix, whose queries start at 0."""
    if first is None and sims.shape[1] != 5 * sims.shape[0]:
        raise ValueError(f"expected an (n_images, 5 n_images) matrix, got {sims.shape}")
    return first or 0


def i2t_ranks(sims, first=None):
    """0-based rank of image queries first..first+b-1: int64 (b,), best of its 5 captions, distractor ties
    against it. sims (b, n_cap): their rows of S; first None: sims is the whole (n, 5n) matrix."""
    n_img, n_cap = sims.shape
    first = _whole_or_part(sims, first)
    _check_gallery(n_img, first, n_cap, 5)
    ranks = np.empty(n_img, dtype=np.int64)
    for rows in _chunks(n_img, n_cap):
        block = np.asarray(sims[rows])  # (b, n_cap)
        own = (first + np.arange(rows.start, rows.stop))[:, None] * 5 + np.arange(5)  # (b, 5) own captions
        gt = block[np.arange(block.shape[0])[:, None], own]
        # #{a : s[a] >= s[c]} minus the own captions >= s[c] (c itself among them): the distractors >= s[c]
        counts = np.stack([(block >= gt[:, k:k + 1]).sum(1) - (gt >= gt[:, k:k + 1]).sum(1) for k in range(5)], axis=1)
        ranks[rows] = counts.min(1)
    return ranks


def t2i_ranks(sims, first=None):
    """0-based rank of caption queries first..first+b-1: int64 (b,), position of image j // 5, ties against
    it. sims (n_img, b): their columns of S (a transposed view of S^T rows is fine); first None: sims is
    the whole (n, 5n) matrix."""
    n_img, n_cap = sims.shape
    first = _whole_or_part(sims, first)
    _check_gallery(n_cap, first, n_img, 1)
    ranks = np.empty(n_cap, dtype=np.int64)
    for cols in _chunks(n_cap, n_img):
        block = np.asarray(sims[:, cols])  # (n_img, b)
        caption = first + np.arange(cols.start, cols.stop)
        gt = block[caption // 5, caption - first - cols.start]  # (b,)
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


def asp_sum(sims, sems):
    """Sum over the query rows of `sims` and `sems` (same shape; may be transposed views) and their items of
    min(rank_s, rank_r) / max(rank_s, rank_r): a float; ASP = 100 x it / sims.size.

    Chunks of rows are ranked by sorting (no per-item comparisons), on as many threads as torch uses
    (numpy's sorts release the GIL); memory is a few chunk-sized buffers per thread. The chunks' sums
    are added in row order, whatever the thread count.
    """
    if sims.shape != sems.shape:
        raise ValueError(f"similarity {sims.shape} and relevance {sems.shape} differ in shape")
    n_q, n = sims.shape
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
        return sum(pool.map(lambda rows: _asp_rows(np.ascontiguousarray(sims[rows]), np.ascontiguousarray(sems[rows])),
                            _chunks(n_q, n)))


def asp(sims, sems):
    """Exact ASP in percent of query rows of `sims` against `sems` (same shape; may be transposed views)."""
    n_q, n = sims.shape
    return 100.0 * asp_sum(sims, sems) / (n_q * n)


# ------------------------------------------------------------------------------------------------
# One chunk of queries, and a direction's summary from its chunks


def i2t_part(rows, first, sems=None):
    """Image queries first..first+b-1: their 0-based ranks (b,) and ASP sum (None without sems).
    rows (b, n_cap): their rows of S (first None: the whole (n, 5n) S); sems: the same rows of M."""
    return i2t_ranks(rows, first), None if sems is None else asp_sum(rows, sems)


def t2i_part(rows, first, sems=None):
    """Caption queries first..first+b-1: their 0-based ranks (b,) and ASP sum (None without sems).
    rows (b, n_img): their rows of S^T (columns of S; first None: the whole S^T); sems: the same rows of M^T."""
    return t2i_ranks(rows.T, first), None if sems is None else asp_sum(rows, sems)


def summary(ranks, asp_total, n_gallery):
    """(r1, r5, r10, medr, meanr, asp) of a direction from all its queries' ranks and ASP sum (asp None
    without one)."""
    return recall_summary(ranks) + (None if asp_total is None else 100.0 * asp_total / (len(ranks) * n_gallery),)


def i2t(sims, sems=None):
    """Image-to-text (r1, r5, r10, medr, meanr, asp) of an (n, 5n) matrix; asp None without sems."""
    return summary(*i2t_part(sims, None, sems), sims.shape[1])


def t2i(sims, sems=None):
    """Text-to-image (r1, r5, r10, medr, meanr, asp) of an (n, 5n) matrix; asp None without sems."""
    return summary(*t2i_part(sims.T, None, None if sems is None else sems.T), sims.shape[0])


def _direction(values):
    return dict(zip(KEYS, values))


def score_chunks(i2t_chunks, t2i_chunks, n_images, n_captions):
    """{"i2t": {r1, r5, r10, medr, meanr, asp}, "t2i": {...}, "rsum"} of one (n_images, n_captions) block
    from chunks of query rows, each direction from its own:

    i2t_chunks yields (first image, rows of S (b, n_captions), the same rows of M or None), t2i_chunks
    (first caption, rows of S^T (b, n_images), rows of M^T or None), in any order, covering every query
    once (first None: one chunk of every query, the whole S or S^T). Only the ranks (one int per query)
    and a running ASP sum are kept between chunks.
    """
    if n_captions != 5 * n_images:
        raise ValueError(f"expected an (n_images, 5 n_images) block, got ({n_images}, {n_captions})")
    out = {}
    for name, chunks, part, n_queries, n_gallery in (("i2t", i2t_chunks, i2t_part, n_images, n_captions),
                                                      ("t2i", t2i_chunks, t2i_part, n_captions, n_images)):
        ranks, total, seen = np.empty(n_queries, dtype=np.int64), 0.0, 0
        for first, rows, sems in chunks:
            start = first or 0  # None: the whole matrix, which i2t_ranks / t2i_ranks check is (n, 5n)
            ranks[start:start + len(rows)], part_sum = part(rows, first, sems)
            total = None if part_sum is None else total + part_sum
            seen += len(rows)
            del rows, sems  # not held while the next chunk is made (a streamed chunk is made on demand)
        if seen != n_queries:
            raise ValueError(f"{name}: chunks hold {seen} queries, expected {n_queries}")
        out[name] = _direction(summary(ranks, total, n_gallery))
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def score_matrix(sims, sems=None, t2i_sims=None):
    """{"i2t": {r1, r5, r10, medr, meanr, asp}, "t2i": {...}, "rsum"} of one (n, 5n) block: score_chunks
    of one chunk per direction.

    t2i_sims: the block whose columns rank the caption queries when it is not `sims` (two-stage
    retrieval ranks the two directions from different candidates).
    """
    t2i_sims = sims if t2i_sims is None else t2i_sims
    return score_chunks([(None, sims, sems)], [(None, t2i_sims.T, None if sems is None else sems.T)], *sims.shape)


def fold_blocks(matrix):
    """The diagonal (n / 5, n) fold blocks of an (n_images, 5 n_images) matrix: each fold's images x captions."""
    return [matrix[lo:hi, 5 * lo:5 * hi] for lo, hi in fold_bounds(matrix.shape[0])]


def mean_of_folds(folds):
    """COCO 1K: the mean of the folds' score dicts at the top level and the list under "folds"."""
    out = {d: {key: (None if folds[0][d][key] is None else float(np.mean([f[d][key] for f in folds])))
               for key in folds[0][d]} for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([f["rsum"] for f in folds]))
    out["folds"] = folds
    return out


def score_folds(blocks, sems_blocks=None, t2i_blocks=None):
    """COCO 1K: score_matrix of each fold block, their mean at the top level, and the list under "folds".

    blocks: the 5 fold blocks of S; sems_blocks: the same blocks of M (asp stays None without them);
    t2i_blocks: score_matrix's t2i_sims of each fold.
    """
    return mean_of_folds([score_matrix(b, m, t) for b, m, t in zip(blocks, sems_blocks or [None] * len(blocks),
                                                                   t2i_blocks or [None] * len(blocks))])


def format_table(scores, title):
    """The paper's table: R@1 R@5 R@10 medr meanr ASP per direction, and rsum."""
    lines = [title, f"{'':6}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>7}{'meanr':>8}{'ASP':>7}"]
    for d in ("i2t", "t2i"):
        s = scores[d]
        a = "-" if s["asp"] is None else f"{s['asp']:.1f}"
        lines.append(f"{d:6}{s['r1']:7.1f}{s['r5']:7.1f}{s['r10']:7.1f}{s['medr']:7.1f}{s['meanr']:8.1f}{a:>7}")
    lines.append(f"rsum {scores['rsum']:.1f}")
    return "\n".join(lines)
