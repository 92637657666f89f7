"""tools.bench's large_gallery case (not among the default cases): a gallery several times COCO 5K evaluated
streamed, at two sizes, with the ANN indexes' recall and speed on stand-in embeddings."""
import argparse
import time

import numpy as np
import torch

import ann_index
import evaluation
import scoring
from daa_loss import SemanticRelevance
from model import SimilarityModel
from pmrp_com.pmrp import StreamedPMRP, pmrp_scores, topk_rows
from tools.bench_common import (_torch_mem, encoder_flops, extrapolate, measure, model_options, random_codes, row,
                                synthetic_captions)
from tools.bench_embedding import RandomBatches
from tools.bench_shortlist import standin_embeddings

LARGE_GALLERY_IMAGES = 25000  # 5x COCO 5K each way: 25,000 images x 125,000 captions
ANN_K = 100  # the large_gallery case's ANN rows: recall of each query's exact top 100
ANN_EFFORTS = {"hnsw": (100, 256), "pca": (), "ivf": (64,)}  # trade-off curves beside the defaults: efSearch, cells probed


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
    seconds, exact seconds, dimensions searched in (i2t, t2i))} for each index kind at ann_index's defaults, {kind: [(effort, i2t recall, t2i recall,
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
    for kind in ANN_EFFORTS:
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
                out[kind] = (*recalls, build_s, search_s, exact_s,
                             tuple(ann_index.searched_dims(indexes[d]) for d in ("i2t", "t2i")))
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
                             + "".join(f"{kind} index (stand-in embeddings, searched in {dims[0]} / {dims[1]} of "
                                       f"{sizes['dims'][2]} dimensions): recall of the exact top {ANN_K} i2t "
                                       f"{i2t:.4f} / t2i {t2i:.4f}, built in {build:.1f} s, searched in {search:.1f} s "
                                       f"against {exact:.1f} s of exact search (products + top {ANN_K}): "
                                       f"{exact / max(search, 1e-9):.1f}x"
                                       + "".join(f", {'efSearch' if kind == 'hnsw' else 'nprobe'} {effort}: "
                                                 f"{min(c_i2t, c_t2i):.4f}, {exact / max(c_s, 1e-9):.1f}x"
                                                 for effort, c_i2t, c_t2i, c_s in report["index_curve"][kind])
                                       + "; "
                                       for kind, (i2t, t2i, build, search, exact, dims) in report["index"].items()) + f"peak {peak_mb:,.0f} MB against "
                             f"{matrix_mb:,.0f} MB for the matrix alone; growth {small:,} -> {large:,} images: time "
                             f"x n^{time_power:.2f}, memory x n^{mem_power:.2f}; R@1 i2t {report['i2t']['r1']:.2f}; "
                             f"{base_note}"))
    return rows
