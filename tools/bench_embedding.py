"""tools.bench's embedding case: a COCO-5K-sized evaluation of VSE and PCME end to end (encoding, scores, R@K,
ASP, PMRP) on random inputs made batch by batch, against SGR's pairs/s extrapolated."""
import argparse
import time
from unittest import mock

import numpy as np
import torch

import evaluation
import scoring
from model import SimilarityModel
from pmrp_com.pmrp import pmrp_scores
from tools.bench_common import (_status_mb, _torch_mem, build_model, encoder_flops, measure, model_options,
                                random_codes, random_inputs, row)


class RandomBatches:
    """An evaluation loader of random inputs, made batch by batch (COCO 5K's features alone are 1.4 GB):
    images yield (features (b, 36, img_dim), ids), captions (word ids (b, L_b), lengths (b,), ids) with
    COCO-like lengths, 6 + Poisson(5.5) words (mean 11.5, as SCAN's tokenised COCO captions)."""

    def __init__(self, n, sizes, captions, batch_size=128, seed=0):
        self.n, self.sizes, self.captions, self.batch_size, self.seed = n, sizes, captions, batch_size, seed

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch_size):
            b = min(self.batch_size, self.n - start)
            ids = torch.arange(start, start + b)
            if not self.captions:
                yield torch.rand(b, 36, self.sizes["dims"][0], generator=gen), ids
                continue
            lengths = 6 + torch.poisson(torch.full((b,), 5.5), generator=gen).long()
            words = torch.randint(4, self.sizes["vocab"], (b, int(lengths.max())), generator=gen)
            yield words.masked_fill(torch.arange(words.shape[1]) >= lengths[:, None], 0), lengths, ids


def bench_embedding(sizes, device):
    """COCO-5K-sized evaluation of VSE and PCME end to end, against SGR's pairs/s extrapolated."""
    n_i = sizes["emb_images"]
    n_c = 5 * n_i
    images, captions = RandomBatches(n_i, sizes, False, seed=1), RandomBatches(n_c, sizes, True, seed=2)
    caption_words = sum(int(batch[1].sum()) for batch in captions)
    rng = np.random.default_rng(4)
    relevance = rng.random((n_i, n_c), dtype=np.float32)
    codes = random_codes(n_i)
    # SGR on a subset, encoders excluded (generous to SGR), as evaluation.similarity_block scores it
    sgr = build_model(sizes, "SGR", device).eval()
    sub_i, sub_c = sizes["emb_sgr"]
    sub_images, sub_captions, sub_lengths = random_inputs(sub_i, sub_c, sizes, device, seed=5)
    with torch.no_grad():
        img_embs, cap_embs = sgr.encode_images(sub_images), sgr.encode_captions(sub_captions, sub_lengths)
        sgr.similarity(img_embs[:2], cap_embs[:4], sub_lengths[:4])  # warm-up
        sgr_s, sgr_mb, _ = measure(lambda: sgr.similarity(img_embs, cap_embs, sub_lengths), device)
    del sgr
    sgr_pairs_per_s = sub_i * sub_c / sgr_s
    rows = []
    for module_name in ("VSE", "PCME"):
        torch.manual_seed(0)
        model = SimilarityModel(argparse.Namespace(**vars(model_options(sizes["dims"], sizes["vocab"], module_name)),
                                                   vse_pool="mean", pcme_samples=7)).to(device).eval()
        encode_s, scoring_mb = [], []
        real_encode = scoring.encode

        def timed_encode(*args):
            start = time.perf_counter()
            out = real_encode(*args)
            encode_s.append(time.perf_counter() - start)
            return out

        def project():
            start_mb = _status_mb("VmRSS")  # measure() has just reset the peak mark
            with mock.patch.object(scoring, "encode", timed_encode):
                sims = evaluation.compute_sims(model, images, captions, device=device)
            scoring_mb.append(_status_mb("VmHWM") - start_mb)  # the peak of encoding + the matrix
            return evaluation.score_matrix(sims, relevance), pmrp_scores(sims, codes, n_fold=0)

        total_s, peak_mb, (metrics, _) = measure(project, device, once=True)
        gflops = encoder_flops(sizes, n_i, caption_words) / encode_s[-1] / 1e9
        score_gflop = 2 * n_i * n_c * sizes["dims"][2] / 1e9
        rows.append(row(f"embedding {module_name}", f"{n_i} images x {n_c} captions, dims "
                        f"{'/'.join(map(str, sizes['dims'][:3]))}", (n_i * n_c / sgr_pairs_per_s, sgr_mb),
                        (total_s, peak_mb), extrapolated=True, mem=_torch_mem(device), scoring_mb=scoring_mb[-1],
                        note=f"encode {encode_s[-1]:.1f} s ({gflops:.0f} GFLOP/s achieved by the encoders, "
                             f"{caption_words:,} words), then scoring ({score_gflop:.0f} GFLOP of matrix "
                             f"product) + R@K + ASP + PMRP {total_s - encode_s[-1]:.1f} s; peak of encoding + "
                             f"matrix {scoring_mb[-1]:,.0f} MB, one (n_i, n_c) float32 matrix being "
                             f"{n_i * n_c * 4 / 2 ** 20:,.0f} MB (the project peak adds ASP's and PMRP's "
                             f"buffers). Baseline: SGR at "
                             f"{sgr_pairs_per_s:,.0f} pairs/s ({sub_i} x {sub_c} pairs, encoders excluded, its "
                             f"peak memory there) extrapolated to {n_i * n_c:,} pairs"
                             + ("; PCME scored by its means" if module_name == "PCME" else "")))
    return rows
