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

Index kinds (all with the inner-product metric): exact (no index: the shortlist model's rows ranked as
plain evaluation ranks them); hnsw, a proximity graph; pca, every item scored, in fewer dimensions; ivf
(faiss.IndexIVFFlat), k-means cells, a tenth of them probed. Ties: an index returns any of the tied items;
recall is measured against the exact top k with ties by lower index.

hnsw and pca search a projection. Exact search is a few large matrix products at the machine's sgemm rate;
a graph walk over 1,024-d rows computes one distance at a time for the few thousand items it visits, reading
each row at random, and was no faster than exact search (0.7x at 10,000 x 50,000). A trained model's items
concentrate on a few directions, so both search the projection onto the fewest principal directions that
keep PROJECTION_ENERGY of the gallery's variance (`principal_directions`; no mean subtracted from the
vectors, which would change their ranking, as faiss's PCAMatrix does), hnsw with a graph over it
(faiss.IndexHNSWFlat), pca with the products of every pair in it (faiss.IndexFlatIP, sgemm at r of d
dimensions' cost); the REFINE_FACTOR x k candidates found are re-scored with the full vectors
(faiss.IndexRefineFlat), so the order returned is the exact inner product's. Where the items spread over
every direction the projection keeps most of them: the search is then as slow as without it, not wrong.
"""
import math
import time

import numpy as np

from errors import InputError

KINDS = ("exact", "hnsw", "pca", "ivf")
INDEXED_MODULES = ("VSE", "PCME", "PCMEpp")  # shortlist models with one embedding per item (search_vectors)
HNSW_NEIGHBOURS = 32  # graph degree M
HNSW_EF_CONSTRUCTION = 200
# efSearch: the candidate list, at least 5/4 of k and of the REFINE_FACTOR x k candidates (see search). Measured
# on the projection (tools.bench stand-in embeddings, 25,000 images x 125,000 captions, k = 100, M = 32,
# k_factor 1.5, both directions): efSearch 128 / 160 return 0.989 / 0.994 of the exact top 100 at 4.0 / 3.4x
# the speed of exact search (M = 16 at 10,000 x 50,000 needs efSearch 200 for 0.996).
HNSW_EF_SEARCH = 160
# The projection's share of the gallery's variance, and the candidates re-scored per result (faiss's
# k_factor): see assets/two_stage.md ("An ANN index") for the trade-off they were chosen from.
PROJECTION_ENERGY = 0.999
REFINE_FACTOR = 1.5
IVF_POINTS_PER_CELL = 256  # n / 256 cells (at most 4 sqrt(n))
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


def principal_directions(gallery, energy):
    """The fewest principal directions of `gallery` ((n, d) -> (d, r) float32, largest first: eigenvectors
    of its covariance) whose variances sum to `energy` of its total variance.

    Inner products are then taken of the uncentred vectors projected on them: for a query q and items g,
    q.g = q.mean + q.(g - mean), the first term the same for every item, so the projection ranks as q.g up to
    the variance left out. (Subtracting the mean from both sides, as faiss's PCAMatrix does, would not: it
    adds -mean.g, which differs per item. And the uncentred second moment would spend the energy on a
    shared offset: an untrained PCME++'s means share one that holds almost all of it.)"""
    gallery = np.asarray(gallery, dtype=np.float64)
    centred = gallery - gallery.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    values, vectors = values[::-1].clip(min=0), vectors[:, ::-1]
    kept = int(np.searchsorted(np.cumsum(values), energy * values.sum())) + 1
    return np.ascontiguousarray(vectors[:, :min(kept, len(values))], dtype=np.float32)


def unprojected_coordinates(module_name):
    """How many trailing coordinates of a model's search vectors hnsw and pca carry as they are: augment's two
    (their norm term can hold most of the gallery's energy while the ranking lives in the means' directions;
    projected with the rest, the energy criterion would keep the norm and drop the means)."""
    return 0 if module_name == "VSE" else 2


def build(kind, gallery, threads=1, unprojected=0):
    """A faiss inner-product index of `gallery` (n, d) float32: kind hnsw, pca (module docstring) or ivf;
    hnsw and pca project all but the last `unprojected` coordinates (unprojected_coordinates)."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    n, d = gallery.shape
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if kind in ("hnsw", "pca"):
        directions = principal_directions(gallery[:, :d - unprojected], PROJECTION_ENERGY)  # (d - unprojected, r)
        r = directions.shape[1] + unprojected
        matrix = np.zeros((r, d), dtype=np.float32)  # faiss's A: (r, d), row-major; the kept coordinates as they are
        matrix[:r - unprojected, :d - unprojected] = directions.T
        matrix[r - unprojected:, d - unprojected:] = np.eye(unprojected)
        projection = faiss.LinearTransform(d, r, False)
        faiss.copy_array_to_vector(matrix.ravel(), projection.A)
        projection.is_trained = True
        if kind == "hnsw":
            projected = faiss.IndexHNSWFlat(r, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            projected.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            projected = faiss.IndexFlatIP(r)
        index = faiss.IndexRefineFlat(faiss.IndexPreTransform(projection, projected))
        index.k_factor = REFINE_FACTOR
    elif kind == "ivf":
        cells = max(1, min(n // 39, round(n / IVF_POINTS_PER_CELL), int(4 * math.sqrt(n))))  # faiss: >= 39 per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.nprobe = min(cells, max(8, math.ceil(IVF_PROBE_SHARE * cells)))
    else:
        raise ValueError(f"index kind must be hnsw, pca or ivf, not {kind!r}")
    index.add(gallery)
    return index


def search(index, queries, k, effort=None):
    """Ids of each query's k best gallery items (int64 (n_q, k), -1 where the index found fewer). effort:
    HNSW's efSearch (at least k) or IVF's cells probed instead of the defaults (a trade-off curve); pca has none."""
    import faiss

    if isinstance(index, faiss.IndexRefineFlat):  # hnsw, pca: the index inside the projection
        projected = faiss.downcast_index(faiss.downcast_index(index.base_index).index)
        if hasattr(projected, "hnsw"):
            projected.hnsw.efSearch = max(k, effort) if effort else max(HNSW_EF_SEARCH, 5 * k // 4)
    elif effort:
        index.nprobe = min(index.nlist, effort)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64)


def searched_dims(index):
    """The dimensions an index searches in: hnsw's and pca's projection, the vectors' own otherwise."""
    import faiss

    if isinstance(index, faiss.IndexRefineFlat):
        return faiss.downcast_index(index.base_index).index.d
    return index.d


def top_k(kind, queries, gallery, k, threads=1, unprojected=0):
    """(ids (n_q, min(k, n_g)), seconds of building, seconds of searching) of an index of `kind` over
    `gallery` (an index is built once and serves every later query: the two are told apart)."""
    started = time.perf_counter()
    index = build(kind, gallery, threads, unprojected)
    built = time.perf_counter()
    ids = search(index, queries, min(k, len(gallery)))
    return ids, built - started, time.perf_counter() - built


def recall(found, exact):
    """Mean over queries of the share of the exact top k (int (n_q, k)) among the found ids (n_q, k)."""
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / max(1, exact.size)
