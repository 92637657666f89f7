"""A model's similarity scores: encoding, similarity shards, the whole matrix, chunks of it for streamed
evaluation, and the pairs two-stage retrieval needs.

A similarity matrix is (n_images, n_captions) = (n, 5n), rows in image order, columns in caption order.
Every image and caption is encoded once (`encode`); scores are computed in shards of shard_size images x
shard_size captions (`similarity_block`). Whatever is asked for (the whole matrix, a fold's block, a chunk of
query rows, the shortlisted pairs), a pair is scored in the same shard call as plain evaluation scores it
wherever the request covers that shard, so the scores are the same bits.

Streamed evaluation (evaluation.py --stream) never holds the matrix: `stream_chunks` hands out chunks of
query rows of a `ModelScores` (encoded models) or `SavedScores` (memory-mapped .npy files), i2t chunks of
image rows over every caption and t2i chunks of caption rows over every image, each at most
chunk_rows(...) x gallery, with the relevance rows of the same queries (from the sparse TF-IDF).
"""
import contextlib
import ctypes

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import fileio
from errors import InputError
from metrics import _chunks, _twice_ranks, score_chunks, score_matrix
from pmrp_com.pmrp import topk_rows

# How a PCME (PCME++) checkpoint's matrix is scored (embedding_models.PCMEHead, PCMEppHead in eval mode), told in the JSON
# of its evaluations.
PCME_SCORING = "means: sigmoid(-a ||mu_image - mu_caption||_2 + b)"
PCMEPP_SCORING = "-CSD: -(||mu_image - mu_caption||^2 + sum sigma_image^2 + sum sigma_caption^2)"
SCORING = {"PCME": PCME_SCORING, "PCMEpp": PCMEPP_SCORING}
# Bytes of one chunk of scores in streamed evaluation (rounded to whole shards, at least one): with its
# relevance rows and the ranking buffers the streamed peak is a few times this, whatever the gallery.
STREAM_CHUNK_BYTES = 64 * 2 ** 20
# Two-stage scoring calls the model once per image with the captions it needs, each call padded to its longest.
# An image with many captions is scored in groups of similar length: at 250 / 500 captions of lengths 8-20 a
# group ending below 0.85 x its longest, at least 16 captions, costs 1.10 / 1.09x a block's pair (SGR; SAF
# 1.20 / 1.21x) against 1.38 / 1.54x (1.53 / 1.98x) in one call; below about 100 captions the calls' own cost
# outweighs the padding saved (50 captions: 1.55x against 1.40x), so they stay one call (assets/two_stage.md).
GROUP_FROM, GROUP_LENGTH_RATIO, GROUP_SMALLEST = 100, 0.85, 16
RELEVANCE_PIECE = 1 << 22  # entries of one sparse product of relevance rows (see relevance_block)

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
    img_embs = _stacked((model.encode_images(images.to(device, non_blocking=True)).float().cpu()
                         for images, _ in tqdm(image_loader, desc="encode images", leave=False, disable=None)),
                        len(image_loader))
    # lengths stay on the CPU, where the text encoder packs by them (a GPU copy came straight back)
    batches = ((model.encode_captions(caps.to(device, non_blocking=True), lengths).float().cpu(), lengths)
               for caps, lengths, _ in tqdm(caption_loader, desc="encode captions", leave=False, disable=None))
    if model.embedding:
        lengths = []

        def rows():
            for embs, lens in batches:
                lengths.append(lens)
                yield embs
        embs = _stacked(rows(), len(caption_loader))
        return img_embs, [] if embs is None else [(0, embs, torch.cat(lengths))]
    captions, start = [], 0
    for embs, lengths in batches:
        captions.append((start, embs, lengths))
        start += len(lengths)
    return img_embs, captions


def _stacked(parts, n_parts):
    """torch.cat of the tensors `parts` yields (n_parts of them, each (b, ...)), each copied into its place as it
    comes and then freed, never all held beside their concatenation. Holding them cost more than three times
    the result, the freed pieces staying in the C heap, fragmented (VSE, 25,000 random full-dim captions:
    a peak of 347 MB for 98 MB of embeddings; 207 MB copied in place). Rows: n_parts x the first part's,
    the loaders' fixed batch size (a longer part grows it). None when there is no part."""
    out, row = None, 0
    for part in parts:
        if out is None:
            out = torch.empty((n_parts * len(part), *part.shape[1:]), dtype=part.dtype)
        if row + len(part) > len(out):
            out = torch.cat([out[:row], torch.empty((len(part), *part.shape[1:]), dtype=part.dtype)])
        out[row:row + len(part)] = part
        row += len(part)
    return None if out is None else out[:row]


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
                 precision_name="fp32", keep_encoded=False):
    """The (n_img, n_cap) similarity matrix of a model, float32, in shards of images x captions.

    Images and captions are encoded once; each shard of `shard_size` images x `shard_size` captions is
    scored by model.similarity on `device` (default: GPU when present). With `blocks` (a list of
    ((i0, i1), (c0, c1)) ranges), only those blocks are scored and a list of matrices is returned.
    Inside an initialised torch.distributed group the shards are dealt out round robin and summed on
    rank 0 (every other entry of a process's matrix is 0): rank 0 returns the result, other ranks None.
    keep_encoded (one process): (the result, img_embs, captions), the encodings `encode` gave.
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
    out = out if blocks is not None else out[0]
    return (out, img_embs, captions) if keep_encoded else out


def validate(model, image_loader, caption_loader, relevance, device=None, shard_size=1000, precision_name="fp32"):
    """Dev-set R@K and ASP: score_matrix of the model's matrix; `relevance` a SemanticRelevance.

    In a torch.distributed group every rank must call it (each scores a share of the matrix); rank 0
    returns the scores, the others None.
    """
    sims = compute_sims(model, image_loader, caption_loader, shard_size, device, precision_name=precision_name)
    return None if sims is None else score_matrix(sims, relevance.matrix())


# ------------------------------------------------------------------------------------------------
# Streamed evaluation: chunks of query rows, never the whole matrix


def chunk_rows(gallery, align=1):
    """Query rows per streamed chunk over `gallery` items: whole multiples of `align` (a model's shard_size:
    a chunk is then whole shards of plain evaluation, scored by the same calls), at least `align`, else at
    most STREAM_CHUNK_BYTES of float32 scores."""
    return align * max(1, STREAM_CHUNK_BYTES // (4 * max(1, gallery) * align))


class ModelScores:
    """Scores of any block of images x captions from models whose split is encoded once.

    encoded: [(model, img_embs, captions, device)], one per model (encode's output; an SGRAF pair averaged
    as plain evaluation averages the two matrices). A block starting at a multiple of shard_size from
    where plain evaluation's block starts is scored in the same shards, so its scores are the same bits.
    """

    def __init__(self, encoded, shard_size, precision_name="fp32"):
        self.encoded, self.shard_size, self.precision_name = encoded, shard_size, precision_name
        _, img_embs, captions, _ = encoded[0]
        self.shape = (len(img_embs), sum(len(c[2]) for c in captions))
        self.align, self.dtype = shard_size, np.dtype(np.float32)

    def block(self, images, caps):
        """float32 (i1 - i0, c1 - c0) scores of images (i0, i1) x captions (c0, c1)."""
        results = []
        for model, img_embs, captions, device in self.encoded:
            with precision(self.precision_name, device):
                results.append(similarity_block(model, img_embs, captions, images, caps, self.shard_size, device))
        return results[0] if len(results) == 1 else sum(results) / len(results)


class SavedScores:
    """Scores of any block of saved matrices (.npy, memory-mapped, averaged as --sims averages them): each
    block is read, checked finite and averaged when asked for (fileio.sims_block)."""

    def __init__(self, paths, n_captions=None, captions_file=None):
        self.paths, self.mats = list(paths), fileio.open_sims(paths, n_captions, captions_file)
        self.shape, self.align, self.dtype = self.mats[0].shape, 1, fileio.sims_dtype(self.mats)

    def block(self, images, caps):
        return fileio.sims_block(self.mats, self.paths, slice(*images), slice(*caps))


def stream_chunks(scores, relevance, images, caps, direction):
    """Chunks of query rows of the block images (i0, i1) x captions (c0, c1) of `scores` (ModelScores or
    SavedScores), as metrics.score_chunks takes them: direction "i2t" yields (first image - i0, rows of S
    (b, c1 - c0), the same rows of M), "t2i" (first caption - c0, rows of S^T (b, i1 - i0), rows of M^T).
    M comes from `relevance` (daa_loss.SemanticRelevance: sparse rows, the block's relevance entries
    computed as in its whole matrix) one chunk at a time; None without it."""
    (i0, i1), (c0, c1) = images, caps
    # No name here holds a chunk while the next is made: one chunk of scores and relevance in memory, not two.
    if direction == "i2t":
        step = chunk_rows(c1 - c0, scores.align)
        for a in range(i0, i1, step):
            b = min(a + step, i1)
            yield (a - i0, scores.block((a, b), caps),
                   None if relevance is None else relevance_block(relevance, (a, b), caps))
    else:
        step = chunk_rows(i1 - i0, scores.align)
        for c in range(c0, c1, step):
            d = min(c + step, c1)
            yield (c - c0, scores.block(images, (c, d)).T,
                   None if relevance is None else relevance_block(relevance, images, (c, d)).T)


def relevance_block(relevance, images, caps):
    """Dense float32 relevance of images (i0, i1) x captions (c0, c1), computed RELEVANCE_PIECE entries of
    image rows at a time: the sparse product of a whole chunk would hold up to three times the dense
    block. Each entry is the sparse dot product of its image row and caption row, as in the whole matrix."""
    (i0, i1), (c0, c1) = images, caps
    out = np.empty((i1 - i0, c1 - c0), dtype=np.float32)
    step = max(1, RELEVANCE_PIECE // max(1, c1 - c0))
    for a in range(i0, i1, step):
        out[a - i0:min(a + step, i1) - i0] = relevance.block(np.arange(a, min(a + step, i1)), np.arange(c0, c1))
    return out


def score_streamed(scores, relevance, images, caps, observe=None):
    """metrics.score_chunks of the block images (i0, i1) x captions (c0, c1) of `scores`, from
    stream_chunks in both directions: never more than one chunk of scores and relevance in memory.
    observe(direction, first, rows), when given, sees every chunk too (e.g. pmrp_com.pmrp.StreamedPMRP.add:
    more metrics from the same pass)."""
    (i0, i1), (c0, c1) = images, caps

    def chunks(direction, n_queries):
        with tqdm(total=n_queries, desc=f"{direction} queries (streamed)", unit="query", disable=None) as bar:
            for chunk in stream_chunks(scores, relevance, images, caps, direction):
                if observe is not None:
                    observe(direction, chunk[0], chunk[1])
                yield chunk
                bar.update(len(chunk[1]))
                del chunk  # not held while the next chunk is made

    return score_chunks(chunks("i2t", i1 - i0), chunks("t2i", c1 - c0), i1 - i0, c1 - c0)


def write_streamed(scores, out):
    """Fill `out` (an (n_images, n_captions) array, e.g. fileio.open_npy_for_writing's memory map) with
    every score, in i2t chunks of image rows."""
    n_img, n_cap = scores.shape
    step = chunk_rows(n_cap, scores.align)
    for a in tqdm(range(0, n_img, step), desc="similarities (streamed to disk)", unit="chunk", disable=None):
        out[a:min(a + step, n_img)] = scores.block((a, min(a + step, n_img)), (0, n_cap))


# ------------------------------------------------------------------------------------------------
# Two-stage retrieval (--shortlist): a shortlist model picks each query's candidates, the main model
# ranks them. Per query, its candidates (its top k gallery items by the shortlist model, or what an ANN
# index found of them) come first, in the main model's order; every other item follows in the shortlist
# model's order.


def shortlist_masks(shortlist, k, picked=None):
    """The candidates of every query: two bool (n_img, n_cap) masks, i2t (each image row's top k captions)
    and t2i (each caption column's top k images), by the shortlist scores `shortlist` (n_img, n_cap),
    ties by lower index (pmrp_com.pmrp.topk_rows, the rule of --save_ranks). k >= the gallery: all.
    picked: (i2t ids (n_img, k), t2i ids (n_cap, k)) found otherwise (an ANN index; -1 = none) instead."""
    i2t_ids, t2i_ids = picked if picked is not None else (topk_rows(shortlist, k), topk_rows(shortlist.T, k))
    masks = []
    for ids, shape in ((i2t_ids, shortlist.shape), (t2i_ids, shortlist.shape[::-1])):
        mask = np.zeros(shape, dtype=bool)
        rows = np.broadcast_to(np.arange(shape[0])[:, None], ids.shape)
        mask[rows[ids >= 0], ids[ids >= 0]] = True
        masks.append(mask)
    return masks[0], masks[1].T


def two_stage_values(shortlist, scores, chosen):
    """The two-stage ranking of each query row as values: float32 (n_q, n), higher ranks first.

    shortlist (n_q, n): the shortlist model's scores; chosen (n_q, n) bool: each row's k_q candidates;
    scores (n_q, n): the main model's, read where chosen only (views fine). Value of item c = the number
    of items ranked strictly below it: (n - k_q) + #{a chosen : scores[a] < scores[c]} for a candidate,
    #{a not chosen : shortlist[a] < shortlist[c]} for any other. (When the candidates are the row's top,
    as exact top k gives them, the latter is #{a : shortlist[a] < shortlist[c]}.) Both are ranks of one
    row in which the other kind is set to +inf or -inf, so items tie exactly where the deciding model
    ties them, and R@K and ASP of these values are those of the ranking; integers under 2^24, exact in
    float32.
    """
    n_q, n = shortlist.shape
    values = np.empty((n_q, n), dtype=np.float32)
    for rows in _chunks(n_q, n):
        picked = np.ascontiguousarray(chosen[rows])
        # 1 + #{a != c : x[a] >= x[c]} = half of _twice_ranks "last": n minus it = #{a : x[a] < x[c]}
        others = np.where(picked, np.array(np.inf, shortlist.dtype), shortlist[rows])  # candidates never below
        below = n - _twice_ranks(others, "last") // 2
        candidates = np.where(picked, scores[rows], np.array(-np.inf, scores.dtype))  # every other one below
        below[picked] = (n - _twice_ranks(candidates, "last") // 2)[picked]
        values[rows] = below
    return values


def _put_rows(table, n, start, rows):
    """Copy `rows` (m, d) into rows start..start+m-1 of `table` (n, d) on the CPU, made on first use in
    their dtype (bf16 under --precision bf16, as a block's own call would use them); returns the table."""
    if table is None:
        table = torch.zeros(n, rows.shape[1], dtype=rows.dtype)
    table[start:start + len(rows)] = rows.cpu()
    return table


class EncodedSplit:
    """A model's split with every item's own work done once, for scoring any pairs of it: each image's and
    caption's encoding, and for SGR/SAF their global attention vectors (VisualSA, TextSA), which a call
    of the model on a block would otherwise recompute for every image and caption in it.

    img_embs and captions as `encode` gives them. SGR/SAF's captions are kept as real words only
    (words (n_words + 1, d), the last a zero row; each caption's first row and length), and the global vectors are computed in
    similarity_block's shards from the same inputs as there (in eval mode a vector depends on its item
    alone), so a shard scored here gives plain evaluation's scores bit for bit. Embedding models (VSE,
    PCME): one row per item, a pair's score is the head on the two rows.
    """

    @torch.no_grad()
    def __init__(self, model, img_embs, captions, shard_size, device, ranges=None):
        """ranges: the blocks ((i0, i1), (c0, c1)) that will be scored (default: the whole split), whose
        shards the global vectors are computed in."""
        self.model, self.img_embs, self.device = model, img_embs, device
        self.n_images = len(img_embs)
        if model.embedding:
            _, self.cap_rows, self.lengths = captions[0]
            self.img_glo = self.cap_glo = None
            return
        self.lengths = torch.cat([lens for _, _, lens in captions]).long()
        words = [embs[torch.arange(embs.shape[1]) < lens[:, None]] for _, embs, lens in captions]
        # + one zero row, which every padded position of a gathered batch reads (one gather, no masking pass)
        self.words = torch.cat(words + [words[0].new_zeros(1, words[0].shape[1])])
        self.firsts = torch.cumsum(self.lengths, 0) - self.lengths
        sim_enc, n_cap = model.sim_enc, len(self.lengths)
        self.edge_weights = sim_enc.folded_edge_weights() if model.module_name == "SGR" else None
        self.img_glo, self.cap_glo = None, None
        for (i0, i1), (c0, c1) in ranges or [((0, self.n_images), (0, n_cap))]:
            for a in range(i0, i1, shard_size):
                b = min(a + shard_size, i1)
                self.img_glo = _put_rows(self.img_glo, self.n_images, a, sim_enc.v_global_w(img_embs[a:b].to(device)))
            for c in range(c0, c1, shard_size):
                d = min(c + shard_size, c1)
                embs, lengths = _caption_slice(captions, c, d)
                self.cap_glo = _put_rows(self.cap_glo, n_cap, c, sim_enc.caption_globals(embs.to(device), lengths))

    def captions(self, ids):
        """Captions `ids` (int64 (m,)): SGR/SAF embeddings (m, L, d) zero-padded to their longest, as
        _caption_slice gives a range; embedding models their rows (m, ...); and lengths (m,)."""
        ids = torch.as_tensor(ids)
        lens = self.lengths[ids]
        if self.model.embedding:
            return self.cap_rows[ids], lens
        position = torch.arange(int(lens.max()))
        rows = torch.where(position < lens[:, None], self.firsts[ids, None] + position, len(self.words) - 1)  # (m, L)
        return torch.nn.functional.embedding(rows, self.words), lens  # a row gather, twice as fast as words[rows]

    @torch.no_grad()
    def scores(self, a, b, ids):
        """float32 numpy (b - a, m): images a..b-1 x captions `ids`.

        SGR/SAF get the captions longest first, the order EncoderSimilarity.forward scores them in (a
        stable sort: the same chunks, the same scores), so that its chunks are slices of the batch."""
        ids = torch.as_tensor(ids)
        order = torch.argsort(self.lengths[ids], descending=True, stable=True) if self.img_glo is not None \
            else torch.arange(len(ids))
        embs, lengths = self.captions(ids[order])
        glo = {} if self.img_glo is None else {"img_glo": self.img_glo[a:b].to(self.device),
                                               "cap_glo": self.cap_glo[ids[order]].to(self.device),
                                               "zero_padded": True,  # captions() pads with zeros
                                               "edge_weights": self.edge_weights}
        out = np.empty((b - a, len(ids)), dtype=np.float32)
        out[:, order.numpy()] = self.model.similarity(self.img_embs[a:b].to(self.device), embs.to(self.device),
                                                      lengths.to(self.device), **glo).float().cpu().numpy()
        return out


def similarity_pairs(split, ranges, needed, shard_size, bar=None):
    """Scores of the marked pairs only: a float32 (i1 - i0, c1 - c0) matrix per block, 0 where a pair is
    not needed; `split` an EncodedSplit.

    ranges: ((i0, i1), (c0, c1)) per block (as compute_sims' `blocks`); needed: bool, one per block.
    In similarity_block's shards, a shard whose every pair is needed is scored in one call with the same
    inputs as there (so a shortlist of the whole gallery gives plain evaluation's scores bit for bit);
    then every image with needed pairs left is scored in one call with all the captions it needs.
    """
    out = []
    for ((i0, i1), (c0, c1)), need in zip(ranges, needed):
        block, left = np.zeros(need.shape, dtype=np.float32), need.copy()
        lengths = split.lengths[c0:c1].numpy()
        for a in range(0, i1 - i0, shard_size):
            rows = slice(a, min(a + shard_size, i1 - i0))
            for c in range(0, c1 - c0, shard_size):
                cols = slice(c, min(c + shard_size, c1 - c0))
                if need[rows, cols].all():
                    block[rows, cols] = split.scores(i0 + rows.start, i0 + rows.stop,
                                                     c0 + np.arange(cols.start, cols.stop))
                    left[rows, cols] = False
                    if bar is not None:
                        bar.update(block[rows, cols].size)
            for i in range(rows.start, rows.stop):
                for columns in length_groups(np.flatnonzero(left[i]), lengths):
                    block[i, columns] = split.scores(i0 + i, i0 + i + 1, c0 + columns)[0]
                    if bar is not None:
                        bar.update(len(columns))
        out.append(block)
    return out


def length_groups(columns, lengths, ratio=GROUP_LENGTH_RATIO, smallest=GROUP_SMALLEST, least=GROUP_FROM):
    """One image's captions `columns` (int (m,)) in groups to score one call each: longest first, a group
    ends where a caption is shorter than `ratio` x the group's first, once it holds `smallest`; fewer than
    `least` captions stay one group, as given. lengths: every column's caption length."""
    if len(columns) < least:
        return [columns] if len(columns) else []
    columns = columns[np.argsort(-lengths[columns], kind="stable")]
    sorted_lengths, groups, start = lengths[columns], [], 0
    for stop in range(1, len(columns) + 1):
        if stop == len(columns) or (stop - start >= smallest and sorted_lengths[stop] < ratio * sorted_lengths[start]):
            groups.append(columns[start:stop])
            start = stop
    return groups


def score_pairs(model, image_loader, caption_loader, ranges, needed, shard_size=1000, device=None,
                precision_name="fp32"):
    """similarity_pairs of a model on the split: images and captions encoded once (as compute_sims), each
    item's global vectors too (EncodedSplit)."""
    device = resolve_device(device)
    model.to(device).eval()
    with precision(precision_name, device):
        img_embs, captions = encode(model, image_loader, caption_loader, device)
        split = EncodedSplit(model, img_embs, captions, shard_size, device, ranges)
        del captions  # the packed words replace the padded batches
        with tqdm(total=int(sum(m.sum() for m in needed)), desc="shortlisted pairs", unit="pair", unit_scale=True,
                  disable=None) as bar:
            return similarity_pairs(split, ranges, needed, shard_size, bar)
