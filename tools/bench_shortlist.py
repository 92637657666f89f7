"""tools.bench's shortlist case: two-stage retrieval (evaluation.py --shortlist) against full SGRAF scoring at
COCO 5K, with the stand-in embeddings that play the shortlist model (also the large_gallery case's ANN vectors)."""
import os

import numpy as np
import torch

import evaluation
import scoring
from tools import bench_common
from tools.bench_common import build_model, max_abs_diff, measure, random_inputs, row


def standin_embeddings(n_images, n_captions, dim, seed=5):
    """What a trained embedding model (VSE) scores, built as make_synthetic_data.py builds its data: each image
    holds 2-4 objects of 80 categories (skewed frequencies) with one of 8 colours, in one of 8 scenes; its
    embedding is the sum of those concepts' fixed random unit prototypes (each object's category + half its
    colour, the scene at half weight) plus its own noise, the image's 4 remaining degrees of freedom
    (norm 0.5); caption j is its image j // 5's plus a caption's noise (norm 0.5: cosine ~0.9 to its image,
    as a trained model puts a caption near its image). l2-normalised float32 (n_images, dim), (n_captions, dim).

    The noise lives in a 64-dimensional subspace, as a trained model's embeddings concentrate on a few
    directions: an index then finds the same neighbours a trained model's would. (Isotropic noise over
    every dimension, as before, makes every item's neighbours random directions, which no trained model
    gives: recall 0.25 at 25K x 125K.)"""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    categories, colours, scenes, basis = unit(80, dim), unit(8, dim), unit(8, dim), unit(64, dim)
    weights = 1.0 / torch.arange(1, 81) ** 0.7  # skewed category frequencies
    n_objects = torch.randint(2, 5, (n_images,), generator=gen)
    objects = torch.multinomial(weights.expand(n_images, -1), 4, replacement=False, generator=gen)  # (n, 4)
    present = (torch.arange(4) < n_objects[:, None]).float()[..., None]  # (n, 4, 1)
    colour = torch.randint(0, 8, (n_images, 4), generator=gen)
    images = (present * (categories[objects] + 0.5 * colours[colour])).sum(1)
    images = images + 0.5 * scenes[torch.randint(0, 8, (n_images,), generator=gen)]
    noise = lambda n: torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1) @ basis  # noqa: E731
    images = torch.nn.functional.normalize(images, dim=1)
    images = torch.nn.functional.normalize(images + 0.5 * noise(n_images), dim=1)
    captions = images.repeat_interleave(5, 0)[:n_captions] + 0.5 * noise(n_captions)
    return images, torch.nn.functional.normalize(captions, dim=1)


def standin_shortlist(n_images, n_captions, dim, seed=5):
    """A function computing the (n_images, n_captions) float32 product of standin_embeddings."""
    images, captions = standin_embeddings(n_images, n_captions, dim, seed)
    return lambda: (images @ captions.T).numpy()


def pair_rates(sizes, device, module_name, per_image):
    """Pairs/s of one model: every pair of a block (similarity_block, plain evaluation), and for each count
    in per_image one call per image with that many random captions (similarity_pairs, --shortlist).
    Returns (full pairs/s, [pairs/s per count], max abs diff of the shortlisted scores to the full ones).
    Best of MAX_RUNS interleaved runs: a shared machine's load swings hit both kinds alike."""
    # Twice as many captions as an image needs: its captions are a part of the pool, never all of it (a shard
    # whose every pair is needed would be scored as a block, as plain evaluation does).
    n_block, n_pool = sizes["shortlist_block"][0], max(sizes["shortlist_block"][1], 2 * max(per_image))
    images, captions, lengths = random_inputs(n_block, n_pool, sizes, device, seed=6)
    model = build_model(sizes, module_name, device).eval()
    with torch.no_grad():
        img_embs, cap_embs = model.encode_images(images).cpu(), model.encode_captions(captions, lengths).cpu()
    batches = [(0, cap_embs, lengths)]
    with torch.no_grad():  # each item's own work (global vectors), done once per item for all its pairs
        split = scoring.EncodedSplit(model, img_embs, batches, 1000, device)
    n_full, n_images = sizes["shortlist_block"][1], sizes["shortlist_images"]
    rng = np.random.default_rng(7)
    needed = []
    for m in per_image:
        mask = np.zeros((n_images, n_pool), dtype=bool)
        for row_mask in mask:
            row_mask[rng.choice(n_pool, size=m, replace=False)] = True
        needed.append(mask)
    evaluation.similarity_block(model, img_embs[:2], batches, (0, 2), (0, 4), 1000, device)  # warm-up
    full_s, pairs_s, scores = [], [[] for _ in needed], [None] * len(needed)
    for _ in range(bench_common.MAX_RUNS):
        full_s.append(measure(lambda: evaluation.similarity_block(
            model, img_embs, batches, (0, n_block), (0, n_full), 1000, device), device, once=True)[0])
        for j, mask in enumerate(needed):
            seconds, _, (scores[j],) = measure(lambda: evaluation.similarity_pairs(
                split, [((0, n_images), (0, n_pool))], [mask], 1000), device, once=True)
            pairs_s[j].append(seconds)
    reference = evaluation.similarity_block(model, img_embs, batches, (0, n_images), (0, n_pool), 1000, device)
    diff = max_abs_diff([(s[mask], reference[mask]) for s, mask in zip(scores, needed)])
    return n_block * n_full / min(full_s), [mask.sum() / min(t) for mask, t in zip(needed, pairs_s)], diff


def shortlist_quality(sizes, device, sgr, saf, shortlist, data_path):
    """R@K and ASP of evaluation.py on `data_path`'s COCO testall: plain SGRAF vs --shortlist for each K, with
    the time of each run (encoders included, one process, what a user waits for)."""
    common = ["--model_path", sgr, "--model_path2", saf, "--data_path", data_path, "--split", "testall",
              "--device", device.type, "--threads", str(torch.get_num_threads())]
    cpu = torch.device("cpu")
    plain_s, plain_mb, plain = measure(lambda: evaluation.main(common), cpu, once=True)

    def summary(report):
        return "; ".join(f"{d} R@1/5/10 {report[d]['r1']:.1f}/{report[d]['r5']:.1f}/{report[d]['r10']:.1f} ASP "
                         f"{report[d]['asp']:.1f}" for d in ("i2t", "t2i")) + f"; rsum {report['rsum']:.1f}"

    rows = []
    for k in sizes["shortlist_k"]:
        two_s, two_mb, two = measure(lambda: evaluation.main(common + ["--shortlist", shortlist, "--shortlist_k",
                                                                       str(k)]), cpu, once=True)
        rows.append(row(f"shortlist quality K = {k}", f"{plain['n_images']} x {plain['n_captions']}, {data_path}",
                        (plain_s, plain_mb), (two_s, two_mb), None,
                        note=f"{os.path.basename(os.path.dirname(shortlist))} shortlists "
                             f"{two['shortlist']['pairs_scored']:,} of {two['shortlist']['pairs_total']:,} pairs; "
                             f"two-stage: {summary(two)}; plain SGRAF: {summary(plain)}"))
    return rows


def bench_shortlist(sizes, device, quality=None):
    """Two-stage retrieval against full SGRAF scoring at 5K scale (time rows), and on trained checkpoints
    when `quality` = (SGR, SAF, shortlist checkpoint, data path) is given (quality rows)."""
    n_img, n_cap = sizes["shortlist_scale"]
    cpu = torch.device("cpu")
    product_s, product_mb, shortlist = measure(standin_shortlist(n_img, n_cap, sizes["dims"][2]), cpu)
    masks = {k: measure(lambda: evaluation.shortlist_masks(shortlist, k), cpu) for k in sizes["shortlist_k"]}
    pairs = {k: int((i2t_mask | t2i_mask).sum()) for k, (_, _, (i2t_mask, t2i_mask)) in masks.items()}
    k_max = max(sizes["shortlist_k"])
    i2t_mask, t2i_mask = masks[k_max][2]
    # The two rankings cost two sorts of every query row whatever K; the stand-in's scores serve as the
    # main model's (only the candidates' are read).
    ranking_s, ranking_mb, _ = measure(lambda: (evaluation.two_stage_values(shortlist, shortlist, i2t_mask),
                                                evaluation.two_stage_values(shortlist.T, shortlist.T, t2i_mask.T)),
                                       cpu, once=True)
    del i2t_mask, t2i_mask
    per_image = [round(pairs[k] / n_img) for k in sizes["shortlist_k"]]
    rates = {name: pair_rates(sizes, device, name, per_image) for name in ("SGR", "SAF")}
    diff = max(r[2] for r in rates.values())
    full_s = sum(n_img * n_cap / r[0] for r in rates.values())
    full_mb = 3 * n_img * n_cap * 4 / 2 ** 20  # plain SGRAF holds the two models' matrices and their mean
    dims = "/".join(map(str, sizes["dims"]))
    rows = []
    for j, k in enumerate(sizes["shortlist_k"]):
        scoring_s = sum(pairs[k] / r[1][j] for r in rates.values())
        total = product_s + masks[k][0] + scoring_s + ranking_s
        peak = max(product_mb, masks[k][1], ranking_mb)
        rows.append(row(f"shortlist K = {k}", f"{n_img:,} x {n_cap:,}, dims {dims}", (full_s, full_mb), (total, peak),
                        diff, extrapolated=True, proj_extrapolated=True,
                        note=f"{pairs[k]:,} pairs scored ({100 * pairs[k] / (n_img * n_cap):.2f} %, {per_image[j]} per "
                             f"image) by SGR and SAF at {rates['SGR'][1][j]:,.0f} / {rates['SAF'][1][j]:,.0f} pairs/s "
                             f"(full: {rates['SGR'][0]:,.0f} / {rates['SAF'][0]:,.0f}): {scoring_s:,.0f} s; "
                             f"shortlist model (embedding product) {product_s:.1f} s, candidates {masks[k][0]:.1f} s, "
                             f"two rankings {ranking_s:.1f} s; baseline: every pair by each model, memory the "
                             f"two models' matrices and their mean; encoders excluded; diff: shortlisted vs full "
                             f"scores"))
    if quality:
        rows += shortlist_quality(sizes, device, *quality)
    return rows
