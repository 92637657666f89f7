"""Approximate nearest-neighbour candidates for two-stage retrieval (evaluation.py --shortlist_index), with faiss.

An embedding model scores a pair from one vector per item, so each query's top k can be searched in an
index of the gallery's vectors instead of ranking the query's whole row of scores:

- VSE: the cosine of unit vectors, an inner product: the index holds the vectors as they are.
- A model whose score falls with a squared distance plus per-item terms (PCME's means' distance, where
  the terms are 0; PCME++'s CSD ||mu_a - mu_b||^2 + sum sigma_a^2 + sum sigma_b^2, whose terms are the
  summed variances) ranks like s(a, b) = -||a - b||^2 - u_a - v_b, and

      -||a - b||^2 - u_a - v_b = 2 a.b - (||a||^2 + u_a) - (||b||^2 + v_b)
                               = [a, 1, -(||a||^2 + u_a)] . [2b, -(||b||^2 + v_b), 1]

  an inner product of vectors augmented by two coordinates (`augment`), exactly the score, so one
  inner-product index serves both kinds. (PCME's eval score sigmoid(-a ||mu_a - mu_b|| + b), a > 0, is
  increasing in -||mu_a - mu_b||^2: the same order.)

Index kinds: exact (no index: the shortlist model's rows ranked as plain evaluation ranks them),
hnsw (faiss.IndexHNSWFlat, a proximity graph) and ivf (faiss.IndexIVFFlat, k-means cells, a few probed),
both with the inner-product metric. Ties: an index returns any of the tied items; recall is measured
against the exact top k with ties by lower index.
"""
import math
import time

import numpy as np

from errors import InputError

KINDS = ("exact", "hnsw", "ivf")
INDEXED_MODULES = ("VSE", "PCME", "PCMEpp")  # shortlist models with one embedding per item (search_vectors)
HNSW_NEIGHBOURS = 32  # graph degree M
HNSW_EF_CONSTRUCTION = 200
# efSearch: the candidate list, at least 5/4 of k (see search). Measured (tools.bench stand-in embeddings, 2,000
# images x 10,000 captions, k = 100, M = 32): efSearch 100 / 128 / 256 give recall 0.996 / 0.998 / 1.000 of
# the exact top 100 (i2t; t2i 0.996 / 0.999 / 1.000) at search times 1 : 1.2 : 2.1. (M = 16 builds 1.7x
# faster but needs efSearch 128 for recall 0.99.)
HNSW_EF_SEARCH = 128
IVF_POINTS_PER_CELL = 256  # about sqrt(n) cells on large galleries
IVF_PROBE_SHARE = 0.1  # cells probed per query, at least 8


def augment(queries, query_terms, gallery, gallery_terms):
    """Vectors whose inner products are -||q - g||^2 - u_q - v_g: queries (n_q, d) with terms u (n_q,),
    gallery (n_g, d) with terms v (n_g,) -> float32 (n_q, d + 2) and (n_g, d + 2).

    q' = [q, 1, -(||q||^2 + u_q)], g' = [2 g, -(||g||^2 + v_g), 1] (module docstring)."""
    queries, gallery = np.asarray(queries, dtype=np.float64), np.asarray(gallery, dtype=np.float64)
    q_norm = (queries ** 2).sum(1) + np.asarray(query_terms, dtype=np.float64)
    g_norm = (gallery ** 2).sum(1) + np.asarray(gallery_terms, dtype=np.float64)
    q_aug = np.concatenate([queries, np.ones((len(queries), 1)), -q_norm[:, None]], 1)
    g_aug = np.concatenate([2 * gallery, -g_norm[:, None], np.ones((len(gallery), 1))], 1)
    return q_aug.astype(np.float32), g_aug.astype(np.float32)


def search_vectors(module_name, img_rows, cap_rows):
    """The vectors to search of a shortlist model's encoded rows (scoring.encode's: VSE (n, d) unit
    vectors, PCME and PCMEpp (n, 2, d) mean and log-variance): ((image queries, caption gallery) for i2t,
    (caption queries, image gallery) for t2i), float32, inner product = the model's ranking (PCMEpp's:
    -CSD itself, embedding_models.negative_csd)."""
    img_rows, cap_rows = np.asarray(img_rows, dtype=np.float32), np.asarray(cap_rows, dtype=np.float32)
    if module_name == "VSE":
        return (img_rows, cap_rows), (cap_rows, img_rows)
    if module_name in ("PCME", "PCMEpp"):
        # per-item terms: PCME's eval mode scores the means' distance alone, PCME++'s CSD adds the summed variances
        means_i, means_c = img_rows[:, 0], cap_rows[:, 0]
        terms_i, terms_c = (np.exp(rows[:, 1].astype(np.float64)).sum(1) if module_name == "PCMEpp"
                            else np.zeros(len(rows)) for rows in (img_rows, cap_rows))
        return augment(means_i, terms_i, means_c, terms_c), augment(means_c, terms_c, means_i, terms_i)
    raise InputError(f"--shortlist_index needs a shortlist model with one embedding per item "
                     f"({', '.join(INDEXED_MODULES)}); {module_name} scores every pair with a network")


def build(kind, gallery, threads=1):
    """A faiss inner-product index of `gallery` (n, d) float32: kind hnsw or ivf."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    n, d = gallery.shape
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif kind == "ivf":
        cells = max(1, min(n // 39, round(n / IVF_POINTS_PER_CELL), int(4 * math.sqrt(n))))  # faiss: >= 39 per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.nprobe = min(cells, max(8, math.ceil(IVF_PROBE_SHARE * cells)))
    else:
        raise ValueError(f"index kind must be hnsw or ivf, not {kind!r}")
    index.add(gallery)
    return index


def search(index, queries, k, effort=None):
    """Ids of each query's k best gallery items (int64 (n_q, k), -1 where the index found fewer). effort:
    HNSW's efSearch (at least k) or IVF's cells probed instead of the defaults (a trade-off curve)."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(k, effort) if effort else max(HNSW_EF_SEARCH, 5 * k // 4)
    elif effort:
        index.nprobe = min(index.nlist, effort)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64)


def top_k(kind, queries, gallery, k, threads=1):
    """(ids (n_q, min(k, n_g)), seconds of building, seconds of searching) of an index of `kind` over
    `gallery` (an index is built once and serves every later query: the two are told apart)."""
    started = time.perf_counter()
    index = build(kind, gallery, threads)
    built = time.perf_counter()
    ids = search(index, queries, min(k, len(gallery)))
    return ids, built - started, time.perf_counter() - built


def recall(found, exact):
    """Mean over queries of the share of the exact top k (int (n_q, k)) among the found ids (n_q, k)."""
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / max(1, exact.size)
