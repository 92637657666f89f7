"""PMRP, exactly PCME's algorithm (evaluate_pmrp_coco.py of naver-ai/pcme), vectorised.

Every COCO image gets a 90-dim multi-hot code of the `category_id`s (1..90) of its instance
annotations; images without any instance are dropped, as queries and from the galleries. Two items are
a plausible match at threshold t when the L1 distance between their images' codes is <= t.
For a query, R = number of plausible items in the gallery, R-precision = plausible items among the top
R retrieved (descending score, ties by lower gallery index) / R, PM-R@1 = whether the top item is
plausible. i2t: query images, gallery captions; t2i: query captions, gallery images.

PCME builds a dict of full rankings per query and walks it in Python for every threshold. Here chunks
of query rows are handled at once: the top R of each row is a mask (top_mask: the ranking rule, which
topk_rows, evaluation.py's --save_ranks and --eccv use too) and the plausible items in it are counted
(see _rprecision); no ranking is materialised. A query's own image is always in its gallery (distance 0), so R >= 1.
"""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

from errors import InputError
from fileio import read_json, read_lines
from layout import fold_bounds

N_CATEGORIES = 90
# Elements of one chunk of query rows: 2^22 x (scores and sorted copy, 2-byte distances, masks) ~ 80 MB.
CHUNK_ELEMENTS = 1 << 22


def read_image_ids(path, n_images, against="the similarity matrix"):
    """COCO image id of each row of an (n_images, 5 n_images) matrix from a testall_ids.txt.

    The file has one id per caption line; captions 5i..5i+4 belong to image i, so their ids must agree.
    `against` names what n_images comes from, in the error for a wrong line count. Returns int64 (n_images,).
    """
    lines = read_lines(path, "image id list")
    try:
        ids = np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError:
        bad = next(n for n, line in enumerate(lines, 1) if not line.strip().lstrip("-").isdigit())
        raise InputError(f"{path}: line {bad} is not an integer image id") from None
    if len(ids) != 5 * n_images:
        raise InputError(f"{path}: {len(ids)} caption lines, but {against} has "
                         f"{5 * n_images} captions ({n_images} images)")
    per_image = ids.reshape(n_images, 5)
    mixed = np.flatnonzero((per_image != per_image[:, :1]).any(1))
    if len(mixed):
        i = mixed[0]
        raise InputError(f"{path}: lines {5 * i + 1}-{5 * i + 5} (the captions of image row {i}) "
                         f"name different images")
    return per_image[:, 0].copy()


def instance_codes(ann_path, image_ids, ids_name="the image id list"):
    """Multi-hot category codes of `image_ids` from a COCO instances file (read with pycocotools).

    Returns uint8 (len(image_ids), 90); an all-zero row is an image without instances (dropped from
    PMRP). Missing file, no `annotations`, or an image id absent from the file's `images` -> InputError.
    """
    data = read_json(ann_path, "COCO instance annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{ann_path}: has no 'annotations' list (not a COCO instances file)")
    if not isinstance(data.get("images"), list):
        raise InputError(f"{ann_path}: has no 'images' list (not a COCO instances file)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise InputError(f"{ann_path}: malformed COCO annotations (missing {err})") from None
    missing = [int(i) for i in image_ids if int(i) not in coco.imgs]
    if missing:
        raise InputError(f"{ann_path}: {len(missing)} image ids of {ids_name} are not among its images "
                         f"(e.g. {missing[0]}); is it instances_val2014.json?")
    codes = np.zeros((len(image_ids), N_CATEGORIES), dtype=np.uint8)
    for row, image_id in enumerate(image_ids):
        for ann in coco.imgToAnns.get(int(image_id), ()):
            category = ann.get("category_id")
            if not isinstance(category, int) or not 1 <= category <= N_CATEGORIES:
                raise InputError(f"{ann_path}: annotation {ann.get('id')} has category_id {category!r}, "
                                 f"not in 1..{N_CATEGORIES}")
            codes[row, category - 1] = 1
    return codes


def _packed(codes):
    """Multi-hot codes (n, 90) as two 64-bit words each: uint64 (n, 2)."""
    words = np.packbits(codes.astype(bool), axis=1, bitorder="little")  # (n, 12) bytes
    return np.pad(words, ((0, 0), (0, 16 - words.shape[1]))).view(np.uint64)


def plausibility_distances(codes, others=None):
    """L1 distance between every pair of multi-hot codes (n, 90) (and `others` (m, 90)) -> int16 (n, n or m).

    For 0/1 vectors |a - b|_1 = popcount(a xor b): the codes are packed into two 64-bit words each.
    """
    words = _packed(codes)
    other_words = words if others is None else _packed(others)
    dist = np.zeros((len(words), len(other_words)), dtype=np.int16)
    for w in range(words.shape[1]):
        dist += np.bitwise_count(words[:, None, w] ^ other_words[None, :, w])
    return dist


def top_mask(block, kth, k):
    """The top k[r] items of each row r of `block` (b, n) as a boolean (b, n) mask, kth (b, 1) the k-th largest.

    PCME's ranking (descending score, ties by lower index, what a stable sort of -score gives) without
    sorting: the items above the k-th value, and the lowest-index items equal to it that fill the slots
    left. The items >= the k-th value are exactly the top k unless ties at it spill over the k-th place;
    only those (rare) rows are trimmed.
    """
    k = np.broadcast_to(k, (block.shape[0],))
    chosen = block >= kth
    spill = np.flatnonzero(chosen.sum(1) > k)
    if len(spill):
        tied = block[spill] == kth[spill]
        room = k[spill] - (block[spill] > kth[spill]).sum(1)  # slots left for the tied items
        chosen[spill] &= ~tied | (np.cumsum(tied, axis=1) <= room[:, None])
    return chosen


def topk_rows(matrix, k):
    """Top-k column indices of every row of `matrix` (n_q, n), in ranking order: int64 (n_q, min(k, n))."""
    n_q, n = matrix.shape
    k = min(k, n)
    idx = np.empty((n_q, k), dtype=np.int64)
    step = max(1, CHUNK_ELEMENTS // max(1, n))
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        block = np.ascontiguousarray(matrix[rows])
        kth = -np.partition(-block, k - 1, axis=1)[:, k - 1:k]  # (b, 1) k-th largest value
        cols = np.nonzero(top_mask(block, kth, k))[1].reshape(-1, k)  # each row's top k, ascending column
        order = np.argsort(-np.take_along_axis(block, cols, axis=1), axis=1, kind="stable")
        idx[rows] = np.take_along_axis(cols, order, axis=1)
    return idx


def topk_rankings(sims, k):
    """Top-k of every query, both directions: (i2t_idx (n_img, k), i2t_scores, t2i_idx (n_cap, k), t2i_scores).

    i2t: caption columns per image row; t2i: image rows per caption column; descending score, ties by
    lower index (topk_rows).
    """
    i2t_idx, t2i_idx = topk_rows(sims, k), topk_rows(sims.T, k)
    return (i2t_idx, np.take_along_axis(sims, i2t_idx, axis=1), t2i_idx, np.take_along_axis(sims.T, t2i_idx, axis=1))


def _plausible_counts(dist_rows, copies, max_thres):
    """R of the query images whose distance rows are dist_rows (b, n + 1) at every threshold: int64
    (max_thres, b), from how many gallery items each image has (`copies` (n + 1,): 5 captions or 1 image,
    0 for a left-out one) rather than counted over every chunk's (b, n_g) distances: one product per
    threshold (float32 holds these counts exactly, in any order of summation)."""
    return np.stack([(dist_rows <= t).astype(np.float32) @ copies for t in range(max_thres)]).astype(np.int64)


def _rprecision_rows(block, dists, R, max_thres):
    """R-precision and R@1 of chunk query rows at thresholds 0..max_thres-1: two float64 (max_thres, b).

    block (b, n_g): the queries' scores, a copy whose left-out gallery items are -inf (they never enter a
    top R; inputs are finite); dists (b, n_g): distance of each query's image to each gallery item's
    (a left-out item's: more than any threshold); R (max_thres, b): plausible items per query.

    No ranking: the R-th largest score v of each row comes from a partition and a sort of the largest
    values only, the top R are top_mask(v, R), and the hits are counted in it; the top item is the first
    maximum (np.argmax), rank 1 under ties by lower index.
    """
    b, n_g = block.shape
    picks = np.arange(b)
    top = np.argmax(block, axis=1)
    rp, r1 = np.empty((max_thres, b)), np.empty((max_thres, b))
    # The R-th largest score for every R up to the chunk's largest R (that of the last threshold):
    # partition off the top K values and sort only those (a full sort when K is large).
    K = int(R[-1].max())
    largest = np.partition(block, n_g - K, axis=1)[:, n_g - K:] if K < n_g // 2 else block
    largest = np.sort(largest, axis=1)  # ascending; the R-th largest is at [-R]
    for t in range(max_thres):
        plausible = dists <= t
        v = largest[picks, largest.shape[1] - R[t]][:, None]
        rp[t] = np.count_nonzero(top_mask(block, v, R[t]) & plausible, axis=1) / R[t]
        r1[t] = plausible[picks, top]
    return rp, r1


def _rprecision(scores, queries, query_image, gallery_image, dist, max_thres):
    """R-precision and R@1 of the query rows `queries` of `scores` (n, n_g) at thresholds 0..max_thres-1.

    query_image (len(queries),) and gallery_image (n_g,) index rows/columns of `dist`; gallery items
    to leave out (images without instances) have gallery_image == -1, which `dist` maps to a distance
    no threshold reaches. `scores` may be a transposed view. Returns two float64 (max_thres, len(queries)),
    chunk of rows by chunk (_rprecision_rows).
    """
    n_q, n_g = len(queries), scores.shape[1]
    left_out = gallery_image < 0
    copies = np.bincount(gallery_image[~left_out], minlength=len(dist)).astype(np.float32)
    plausible_count = _plausible_counts(dist, copies, max_thres)  # (max_thres, n + 1)
    rp = np.empty((max_thres, n_q))
    r1 = np.empty((max_thres, n_q))
    step = max(1, CHUNK_ELEMENTS // max(1, n_g))
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        block = np.array(scores[queries[rows]], dtype=scores.dtype, order="C")  # (b, n_g) copy
        block[:, left_out] = -np.inf
        dists = np.take(dist[query_image[rows]], gallery_image, axis=1)  # (b, n_g)
        rp[:, rows], r1[:, rows] = _rprecision_rows(block, dists, plausible_count[:, query_image[rows]], max_thres)
    return rp, r1


class StreamedPMRP:
    """PMRP of one block (the whole split, or a fold) from chunks of its query rows as a streamed evaluation
    scores them, never the matrix nor the (n, n) image distances: add("i2t", first image, rows of S
    (b, 5n)) and add("t2i", first caption, rows of S^T (b, n)), each direction's chunks in query order, then
    result(). codes (n, 90): the block's images' codes. The same numbers as pmrp_scores(n_fold=0) on the
    block: the same per-chunk code (_rprecision_rows), the distances and R of each chunk's queries computed
    from their codes."""

    def __init__(self, codes, max_thres=3):
        if not codes.any():
            raise InputError("no image of the split has an instance annotation")
        self.codes, self.max_thres, n = codes, max_thres, len(codes)
        image = np.where(codes.any(1), np.arange(n), -1)  # index of each image, -1 = dropped
        caption_image = np.repeat(image, 5)
        self.sides = {"i2t": (image, caption_image), "t2i": (caption_image, image)}  # (query image, gallery image)
        self.parts = {"i2t": [], "t2i": []}
        self.copies = {d: np.bincount(g[g >= 0], minlength=n + 1).astype(np.float32) for d, (_, g) in self.sides.items()}

    def add(self, direction, first, rows):
        query_image, gallery_image = self.sides[direction]
        n, n_g = len(self.codes), rows.shape[1]
        step = max(1, CHUNK_ELEMENTS // max(1, n_g))
        for start in range(0, len(rows), step):
            ids = first + np.arange(start, min(start + step, len(rows)))
            kept = query_image[ids] >= 0
            images = query_image[ids[kept]]
            if not len(images):
                continue
            block = np.array(rows[start:start + step][kept], dtype=rows.dtype, order="C")
            block[:, gallery_image < 0] = -np.inf
            dist_rows = np.full((len(images), n + 1), np.iinfo(np.int16).max, dtype=np.int16)  # column n: left out
            dist_rows[:, :n] = plausibility_distances(self.codes[images], self.codes)
            R = _plausible_counts(dist_rows, self.copies[direction], self.max_thres)
            self.parts[direction].append(_rprecision_rows(block, np.take(dist_rows, gallery_image, axis=1), R,
                                                          self.max_thres))

    def result(self):
        """{"i2t": {"pmrp", "pmr1", "pmrp_thres"}, "t2i": {...}} of the chunks added."""
        return {d: _summary(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1))
                for d, parts in self.parts.items()}


def _summary(rp, r1):
    """The JSON block of one direction from (max_thres, n_q) R-precisions and R@1s (in percent)."""
    thres = {str(t): 100.0 * float(rp[t].mean()) for t in range(rp.shape[0])}
    return {"pmrp": float(np.mean(list(thres.values()))), "pmr1": 100.0 * float(r1.mean()),
            "pmrp_thres": thres}


def _block_scores(sims, codes, max_thres):
    """PMRP of one block: sims (n, 5n) image x caption rows/cols, codes (n, 90) of its images."""
    valid = codes.any(1)  # images with at least one instance
    n = len(codes)
    dist = np.full((n + 1, n + 1), np.iinfo(np.int16).max, dtype=np.int16)  # index -1: left out
    dist[:n, :n] = plausibility_distances(codes)
    image = np.where(valid, np.arange(n), -1)  # dist index of each image, -1 = dropped
    caption_image = np.repeat(image, 5)
    image_rows, caption_cols = np.flatnonzero(valid), np.flatnonzero(caption_image >= 0)
    i2t = _rprecision(sims, image_rows, image[image_rows], caption_image, dist, max_thres)
    t2i = _rprecision(sims.T, caption_cols, caption_image[caption_cols], image, dist, max_thres)
    return _summary(*i2t), _summary(*t2i)


def _mean_blocks(blocks):
    """Mean over folds of per-fold JSON blocks (every number averaged)."""
    first = blocks[0]
    return {"pmrp": float(np.mean([b["pmrp"] for b in blocks])),
            "pmr1": float(np.mean([b["pmr1"] for b in blocks])),
            "pmrp_thres": {t: float(np.mean([b["pmrp_thres"][t] for b in blocks])) for t in first["pmrp_thres"]}}


def pmrp_scores(sims, codes, n_fold=5, max_thres=3):
    """PMRP of an (n_images, 5 n_images) similarity matrix given the images' codes (n_images, 90).

    n_fold 5: the five 1K-style folds (images f n/5 .. (f+1) n/5 - 1 and their captions), averaged;
    n_fold 0: the whole split. Returns {"n_fold", "i2t": {"pmrp", "pmr1", "pmrp_thres": {"0", ...}},
    "t2i": {...}} in percent.
    """
    n = sims.shape[0]
    if n_fold not in (0, 5):
        raise InputError(f"--n_fold must be 5 or 0, got {n_fold}")
    if not codes[:n].any():
        raise InputError("no image of the split has an instance annotation")
    bounds = fold_bounds(n) if n_fold else [(0, n)]
    results = []
    for lo, hi in bounds:
        if not codes[lo:hi].any():
            raise InputError(f"no image of fold rows {lo}..{hi - 1} has an instance annotation")
        results.append(_block_scores(sims[lo:hi, 5 * lo:5 * hi], codes[lo:hi], max_thres))
    return {"n_fold": n_fold,
            "i2t": _mean_blocks([r[0] for r in results]),
            "t2i": _mean_blocks([r[1] for r in results])}
