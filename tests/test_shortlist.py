"""Two-stage retrieval (evaluation.py --shortlist): a shortlist of the whole gallery is plain evaluation,
a small one matches a brute-force restatement (full matrices, each query's ranking rebuilt by sorting),
the pairs scored are the union of the candidates, and bad input is refused before anything is written."""
import json
import os

import numpy as np
import pytest

import checkpoint
import errors
import evaluation
import metrics
import scoring
from daa_loss import SemanticRelevance
from tests.test_evaluation import KEYS, _expect_error, _tiny_checkpoint, assert_scores, brute_ranks, brute_summary
from tools.baselines.asp_sort import asp_loop


def brute_two_stage(shortlist, scores, k, chosen=None):
    """Each query row's two-stage ranking as values (n_q, n): the row's top k by `shortlist` (a stable sort:
    ties by lower index; or the row's True items of `chosen`) keyed (1, main score), every other item
    (0, shortlist score); a value is the key's place among the row's distinct keys, so equal keys tie and
    order is the keys' order."""
    values = np.empty(shortlist.shape)
    for q in range(shortlist.shape[0]):
        candidates = set(np.argsort(-shortlist[q], kind="stable")[:k].tolist()) if chosen is None \
            else set(np.flatnonzero(chosen[q]).tolist())
        keys = [(1, scores[q, c]) if c in candidates else (0, shortlist[q, c]) for c in range(shortlist.shape[1])]
        place = {key: rank for rank, key in enumerate(sorted(set(keys)))}
        values[q] = [place[key] for key in keys]
    return values


def brute_report(shortlist, scores, relevance, k):
    """R@K, medr, meanr and ASP by loops: i2t from image rows, t2i from caption rows (of the transposes)."""
    i2t_values = brute_two_stage(shortlist, scores, k)
    t2i_values = brute_two_stage(shortlist.T, scores.T, k).T
    out = {"i2t": dict(zip(KEYS, brute_summary(brute_ranks(i2t_values)[0]) + (asp_loop(i2t_values, relevance),))),
           "t2i": dict(zip(KEYS, brute_summary(brute_ranks(t2i_values)[1]) + (asp_loop(t2i_values.T, relevance.T),)))}
    out["rsum"] = sum(out[d][f"r{r}"] for d in ("i2t", "t2i") for r in (1, 5, 10))
    return out


def brute_pairs(shortlist, k):
    """Number of distinct (image, caption) pairs among every image's top k captions and caption's top k images."""
    rows = {(i, int(c)) for i in range(shortlist.shape[0]) for c in np.argsort(-shortlist[i], kind="stable")[:k]}
    cols = {(int(i), c) for c in range(shortlist.shape[1]) for i in np.argsort(-shortlist[:, c], kind="stable")[:k]}
    return len(rows | cols)


@pytest.mark.parametrize("seed,levels,k", [(0, 3, 3), (1, 4, 7), (2, 1000, 2), (3, 2, 40)])
def test_two_stage_values_against_sorting(seed, levels, k, monkeypatch):
    """Few score levels: ties in the shortlist (which candidates, and the order of the rest) and among the
    candidates' main scores (they must stay ties); k = 40 is the whole gallery of a t2i query and of an
    i2t one. Every value of the metrics against the restatement's loops."""
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 60)  # several uneven chunks of rows
    rng = np.random.default_rng(seed)
    shortlist = rng.integers(0, levels, (8, 40)).astype(np.float32)
    scores = rng.integers(0, levels, (8, 40)).astype(np.float32)
    relevance = rng.integers(0, 3, (8, 40)).astype(np.float32)
    i2t_mask, t2i_mask = evaluation.shortlist_masks(shortlist, k)
    assert (i2t_mask.sum(1) == min(k, 40)).all() and (t2i_mask.sum(0) == min(k, 8)).all()
    assert int((i2t_mask | t2i_mask).sum()) == brute_pairs(shortlist, k)
    i2t_values = evaluation.two_stage_values(shortlist, scores, i2t_mask)
    t2i_values = evaluation.two_stage_values(shortlist.T, scores.T, t2i_mask.T).T
    report = evaluation.score_matrix(i2t_values, relevance, t2i_values)
    assert_scores(report, brute_report(shortlist, scores, relevance, k))
    if k >= 40:  # every item a candidate: the main model's own ranking
        assert_scores(report, evaluation.score_matrix(scores, relevance))


@pytest.fixture(scope="module")
def models(synth, tmp_path_factory):
    """Tiny untrained checkpoints: an SGR and an SAF (the main models) and a VSE embedding model (the shortlist)."""
    d = tmp_path_factory.mktemp("shortlist_ckpt")
    return {name: _tiny_checkpoint(synth, str(d / f"{name}.pth.tar"), module, seed)
            for name, module, seed in (("sgr", "SGR", 0), ("saf", "SAF", 1), ("shortlist", "VSE", 2))}


def _argv(synth, *extra):
    return ["--vocab_path", synth.vocab_path, "--split", "testall", "--batch_size", "32", "--device", "cpu",
            "--shard_size", "40", *extra]


def _run(synth, tmp_path, *extra):
    out = tmp_path / "out.json"
    assert errors.run(evaluation.main, _argv(synth, "--json", str(out), *extra)) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("pair", [False, True], ids=["one model", "SGRAF pair"])
def test_whole_gallery_shortlist_is_plain_evaluation(synth, models, tmp_path, one_thread, pair):
    """K = the gallery (250 captions; 50 per fold with --fold5) gives plain evaluation's JSON; K = 50, every
    image of the split for a t2i query but not every caption for an i2t one, gives plain t2i."""
    main = ["--model_path", models["sgr"]] + (["--model_path2", models["saf"]] if pair else [])
    shortlist = ["--shortlist", models["shortlist"], "--shortlist_k"]
    n = synth.sizes["testall"]
    plain = {}
    for fold5, k in (([], 5 * n), (["--fold5"], n)):
        plain[bool(fold5)] = _run(synth, tmp_path, *main, *fold5)
        two = _run(synth, tmp_path, *main, *fold5, *shortlist, str(k))
        assert set(two) == set(plain[bool(fold5)]) | {"shortlist"}
        for key in set(plain[bool(fold5)]) - {"provenance"}:
            assert two[key] == plain[bool(fold5)][key], key
        assert two["shortlist"]["pairs_scored"] == two["shortlist"]["pairs_total"] == (n * n if fold5 else 5 * n * n)
    partial = _run(synth, tmp_path, *main, *shortlist, str(n))
    assert partial["t2i"] == plain[False]["t2i"] and partial["shortlist"]["pairs_scored"] == 5 * n * n


def test_small_shortlist_against_brute_force(synth, models, tmp_path, one_thread):
    """K = 5 on the whole testall: R@K, medr, meanr and ASP of both directions against the loops on the full
    matrices of the shortlist model and of the SGRAF pair, as plain evaluation saves them; the pairs scored
    are the union of the candidates."""
    full, shortlist = tmp_path / "sgraf.npy", tmp_path / "shortlist.npy"
    _run(synth, tmp_path, "--model_path", models["sgr"], "--model_path2", models["saf"], "--save_sims", str(full))
    _run(synth, tmp_path, "--model_path", models["shortlist"], "--save_sims", str(shortlist))
    S, L = np.load(full), np.load(shortlist)
    k = 5
    # Candidates scored alone can differ from the full matrix in the last bit (another batch shape); no two
    # candidates of a query are that close here, so their order is the full matrix's. (The exact ties are
    # a caption the synthetic split holds twice: one input, one score, in any call.)
    i2t_mask, t2i_mask = evaluation.shortlist_masks(L, k)
    for scores, mask in ((S, i2t_mask), (S.T, t2i_mask.T)):
        gaps = np.diff(np.sort(scores[mask].reshape(len(scores), -1), axis=1), axis=1)
        assert gaps[gaps > 0].min() > 1e-6
    report = _run(synth, tmp_path, "--model_path", models["sgr"], "--model_path2", models["saf"],
                  "--shortlist", models["shortlist"], "--shortlist_k", str(k))
    captions = open(os.path.join(synth.coco_root, "testall_caps.txt"), encoding="utf-8").read().splitlines()
    assert_scores(report, brute_report(L, S, SemanticRelevance(captions).matrix(), k))
    info = report["shortlist"]
    assert info["pairs_scored"] == brute_pairs(L, k) and info["pairs_total"] == S.size
    assert info["k"] == k and info["checkpoint"] == models["shortlist"] and info["module_name"] == "VSE"


def _altered_checkpoint(source, path, **changes):
    """A copy of checkpoint `source` with opt fields and top-level entries changed (opt_<field>=value)."""
    ckpt = checkpoint.load_checkpoint(source)
    for key, value in changes.items():
        if key.startswith("opt_"):
            setattr(ckpt["opt"], key[4:], value)
        else:
            ckpt[key] = value
    checkpoint.save_checkpoint(ckpt, path)
    return path


def test_shortlist_bad_inputs(synth, models, tmp_path, capsys):
    out = tmp_path / "never.json"
    main = ["--model_path", models["sgr"], "--json", str(out)]
    shortlist = ["--shortlist", models["shortlist"]]
    for k in ("0", "-3"):
        _expect_error(capsys, _argv(synth, *main, *shortlist, "--shortlist_k", k), out, "--shortlist_k")
    _expect_error(capsys, _argv(synth, *main, *shortlist), out, "--shortlist_k")
    _expect_error(capsys, _argv(synth, *main, "--shortlist_k", "5"), out, "--shortlist")
    sims = tmp_path / "s.npy"
    np.save(sims, np.zeros((50, 250), dtype=np.float32))
    _expect_error(capsys, ["--sims", str(sims), "--data_path", synth.data_path, "--data_name", "coco_precomp",
                           "--split", "testall", "--json", str(out), *shortlist, "--shortlist_k", "5"], out, "--sims")
    saved = tmp_path / "never.npy"
    _expect_error(capsys, _argv(synth, *main, *shortlist, "--shortlist_k", "5", "--save_sims", str(saved)), out,
                  "--save_sims")
    assert not saved.exists()
    other_data = _altered_checkpoint(models["shortlist"], str(tmp_path / "f30k.pth.tar"), opt_data_name="f30k_precomp")
    _expect_error(capsys, _argv(synth, *main, "--shortlist", other_data, "--shortlist_k", "5"), out, other_data,
                  "f30k_precomp")
    other_dim = _altered_checkpoint(models["shortlist"], str(tmp_path / "dim.pth.tar"), opt_img_dim=2048)
    _expect_error(capsys, _argv(synth, *main, "--shortlist", other_dim, "--shortlist_k", "5"), out, other_dim)
    # A stored vocabulary of the same size with two words' ids swapped; the main model reads its vocab_path.
    vocab = json.loads(open(os.path.join(synth.vocab_path, "coco_precomp_vocab.json"), encoding="utf-8").read())
    word2idx = dict(vocab["word2idx"])
    first, second = sorted(word2idx, key=word2idx.get)[4:6]
    word2idx[first], word2idx[second] = word2idx[second], word2idx[first]
    other_vocab = _altered_checkpoint(models["shortlist"], str(tmp_path / "vocab.pth.tar"), vocab=word2idx)
    argv = _argv(synth, *main, "--shortlist", other_vocab, "--shortlist_k", "5")[2:]  # no --vocab_path: their own
    _expect_error(capsys, argv, out, other_vocab, "vocabulary")


# ------------------------------------------------------------------------------------------------
# Any module as the main model, per-fold shortlists, each item's work done once, ANN candidates


def test_two_stage_values_of_any_candidates():
    """Candidates that are not the row's top (an ANN index's), a different number per row, ties in both
    models: the ranking keeps them first in the main model's order, the rest in the shortlist's."""
    rng = np.random.default_rng(12)
    shortlist = rng.integers(0, 4, (6, 30)).astype(np.float32)
    scores = rng.integers(0, 4, (6, 30)).astype(np.float32)
    chosen = rng.random((6, 30)) < np.linspace(0.05, 0.6, 6)[:, None]
    values = evaluation.two_stage_values(shortlist, scores, chosen)
    expected = brute_two_stage(shortlist, scores, None, chosen)
    for q in range(6):  # the same order and ties: equal where the brute values are equal, ordered alike
        assert (np.sign(values[q][:, None] - values[q][None, :]) ==
                np.sign(expected[q][:, None] - expected[q][None, :])).all()


@pytest.fixture(scope="module")
def any_main(synth, tmp_path_factory):
    """One tiny checkpoint of every module, and another VSE as the shortlist model (PCMEpp: a shortlist model
    only, below)."""
    d = tmp_path_factory.mktemp("any_main")
    ckpts = {m: _tiny_checkpoint(synth, str(d / f"{m}.pth.tar"), m, seed) for seed, m in enumerate(("SGR", "SAF", "VSE",
                                                                                                     "PCME", "PCMEpp"))}
    ckpts["shortlist"] = _tiny_checkpoint(synth, str(d / "shortlist.pth.tar"), "VSE", 7)
    return ckpts


def _as_shortlisted(synth, paths, S, L, k, shard_size, folds=False):
    """S with the shortlisted pairs' entries replaced by the main models' scores as two-stage retrieval scores
    them (scoring.score_pairs, averaged over `paths`), checked within 1e-6 of S: a candidate scored alone
    can differ from the full matrix in the last bit, which could reorder two near-tied candidates of these
    untrained models in a brute-force comparison on S itself."""
    import checkpoint
    import data
    import torch
    import vocab as vocab_lib
    from model import SimilarityModel

    vocab = vocab_lib.deserialize_vocab(os.path.join(synth.vocab_path, "coco_precomp_vocab.json"))
    n = S.shape[0]
    ranges = evaluation.fold_ranges(n) if folds else [((0, n), (0, 5 * n))]
    needed = []
    for (i0, i1), (c0, c1) in ranges:
        i2t_mask, t2i_mask = evaluation.shortlist_masks(L[i0:i1, c0:c1], k)
        needed.append(i2t_mask | t2i_mask)
    results = []
    for path in paths:
        model = SimilarityModel.from_checkpoint(checkpoint.load_checkpoint(path), path, len(vocab))
        images, captions, _ = data.get_eval_loaders(synth.data_path, "coco_precomp", "testall", vocab, 32, 0)
        results.append(evaluation.score_pairs(model, images, captions, ranges, needed, shard_size, torch.device("cpu")))
    out = S.copy()
    for ((i0, i1), (c0, c1)), need, blocks in zip(ranges, needed, zip(*results)):
        pairs = sum(blocks) / len(blocks)
        np.testing.assert_allclose(pairs[need], S[i0:i1, c0:c1][need], rtol=0, atol=1e-6)
        out[i0:i1, c0:c1][need] = pairs[need]
    return out


@pytest.mark.parametrize("module", ["SGR", "SAF", "VSE", "PCME"])
def test_every_module_as_main_model(synth, any_main, tmp_path, one_thread, module):
    """K = 5 on the whole testall against the loops on the full matrices; K = the gallery = plain evaluation."""
    main = ["--model_path", any_main[module]]
    plain = _run(synth, tmp_path, *main, "--save_sims", str(tmp_path / "main.npy"))
    _run(synth, tmp_path, "--model_path", any_main["shortlist"], "--save_sims", str(tmp_path / "short.npy"))
    S, L = np.load(tmp_path / "main.npy"), np.load(tmp_path / "short.npy")
    S = _as_shortlisted(synth, [any_main[module]], S, L, 5, 40)
    report = _run(synth, tmp_path, *main, "--shortlist", any_main["shortlist"], "--shortlist_k", "5")
    captions = open(os.path.join(synth.coco_root, "testall_caps.txt"), encoding="utf-8").read().splitlines()
    assert_scores(report, brute_report(L, S, SemanticRelevance(captions).matrix(), 5))
    whole = _run(synth, tmp_path, *main, "--shortlist", any_main["shortlist"], "--shortlist_k", str(S.shape[1]))
    for key in set(plain) - {"provenance"}:
        assert whole[key] == plain[key], key
    assert ("pcme_scoring" in report) == (module == "PCME")


def test_fold5_small_shortlist_against_brute_force_per_fold(synth, any_main, tmp_path, one_thread):
    """--fold5 with K = 3 below a fold's gallery (10 images, 50 captions): each fold against the loops on its
    block of the full matrices (the fold's images and captions offset into the split), an SGRAF pair."""
    main = ["--model_path", any_main["SGR"], "--model_path2", any_main["SAF"], "--shard_size", "1000"]
    _run(synth, tmp_path, *main, "--save_sims", str(tmp_path / "main.npy"))
    _run(synth, tmp_path, "--model_path", any_main["shortlist"], "--save_sims", str(tmp_path / "short.npy"),
         "--shard_size", "1000")
    S, L = np.load(tmp_path / "main.npy"), np.load(tmp_path / "short.npy")
    S = _as_shortlisted(synth, [any_main["SGR"], any_main["SAF"]], S, L, 3, 1000, folds=True)
    report = _run(synth, tmp_path, *main, "--fold5", "--shortlist", any_main["shortlist"], "--shortlist_k", "3")
    captions = open(os.path.join(synth.coco_root, "testall_caps.txt"), encoding="utf-8").read().splitlines()
    M = SemanticRelevance(captions).matrix()
    assert len(report["folds"]) == 5
    pairs = 0
    for f, fold in enumerate(report["folds"]):
        block = np.s_[10 * f:10 * f + 10, 50 * f:50 * f + 50]
        assert_scores(fold, brute_report(L[block], S[block], M[block], 3))
        pairs += brute_pairs(L[block], 3)
    assert report["shortlist"]["pairs_scored"] == pairs and report["shortlist"]["pairs_total"] == 5 * 10 * 50


def _encoded_testall(synth, path):
    """A checkpoint's model and the synthetic testall encoded by it: (model, img_embs, captions, device)."""
    import checkpoint
    import data
    import torch
    import vocab as vocab_lib
    from model import SimilarityModel

    vocab = vocab_lib.deserialize_vocab(os.path.join(synth.vocab_path, "coco_precomp_vocab.json"))
    model = SimilarityModel.from_checkpoint(checkpoint.load_checkpoint(path), path, len(vocab))
    images, captions, _ = data.get_eval_loaders(synth.data_path, "coco_precomp", "testall", vocab, 32, 0)
    device = torch.device("cpu")
    return (model, *evaluation.encode(model, images, captions, device), device)


@pytest.mark.parametrize("module", ["SGR", "SAF", "VSE", "PCME"])
def test_reused_item_state_scores_as_todays_pairs(synth, any_main, module):
    """EncodedSplit (each item's encoding and SGR/SAF global vectors computed once) against a model call on
    the same pairs that recomputes them (what shortlisted pairs cost before): per image, 7 random captions;
    a whole shard bit for bit against similarity_block."""
    import torch

    model, img_embs, caps, device = _encoded_testall(synth, any_main[module])
    split = scoring.EncodedSplit(model, img_embs, caps, 20, device)
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for i in range(0, 50, 7):
            ids = rng.choice(250, 7, replace=False)
            embs, lengths = split.captions(ids)
            today = model.similarity(img_embs[i:i + 1], embs, lengths).numpy()  # globals recomputed in the call
            np.testing.assert_allclose(split.scores(i, i + 1, ids), today, rtol=0, atol=1e-6)
    shard = evaluation.similarity_block(model, img_embs, caps, (20, 40), (40, 60), 20, device)
    np.testing.assert_array_equal(split.scores(20, 40, np.arange(40, 60)), shard)


def test_augmented_vectors_give_the_distance_scores():
    """[a, 1, -(|a|^2 + u)] . [2b, -(|b|^2 + v), 1] = -|a - b|^2 - u - v, and a PCME model's search vectors
    rank as its eval scores (sigmoid(-s |mu_i - mu_c| + b) of the means)."""
    import ann_index
    import torch

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(7, 6)), rng.normal(size=(11, 6))
    u, v = rng.random(7), rng.random(11)
    q, g = ann_index.augment(a, u, b, v)
    assert q.shape == (7, 8) and g.shape == (11, 8)
    expected = -((a[:, None] - b[None]) ** 2).sum(-1) - u[:, None] - v[None, :]
    np.testing.assert_allclose(q.astype(np.float64) @ g.T.astype(np.float64), expected, rtol=1e-5, atol=1e-5)
    from embedding_models import PCMEHead
    torch.manual_seed(0)
    head = PCMEHead(6).eval()
    img, cap = head.embed_images(torch.randn(5, 4, 6)), head.embed_captions(torch.randn(9, 3, 6), torch.tensor([3] * 9))
    with torch.no_grad():
        S = head(img, cap).numpy()
        (iq, cg), (cq, ig) = ann_index.search_vectors("PCME", img.numpy(), cap.numpy())
        distance = np.sqrt(np.maximum(-(iq @ cg.T), 0) + 1e-6)
        np.testing.assert_allclose(torch.sigmoid(head.shift - head.log_scale.exp() * torch.from_numpy(distance)).numpy(),
                                   S, atol=1e-5)
        np.testing.assert_allclose(cq @ ig.T, (iq @ cg.T).T, atol=1e-5)  # t2i: the same scores, transposed


def test_pcmepp_search_vectors_are_minus_csd():
    """PCME++'s search vectors: inner products = -CSD of embedding_models.negative_csd (the variance sums are per-item
    terms), so they rank as it does, both directions."""
    import ann_index
    import torch

    from embedding_models import PCMEppHead, negative_csd
    torch.manual_seed(0)
    head = PCMEppHead(6).eval()
    with torch.no_grad():
        img = head.embed_images(torch.randn(5, 4, 6))
        cap = head.embed_captions(torch.randn(9, 3, 6), torch.tensor([3, 2, 1] * 3))
        # log-variances around 0, not the untrained heads' about -7: variance sums of the means' scale that
        # differ between items, a real per-item term
        img[:, 1], cap[:, 1] = torch.randn(5, 6), torch.randn(9, 6)
        expected = negative_csd(img.double(), cap.double()).numpy()
    assert np.ptp(np.exp(img[:, 1].numpy()).sum(1)) > 1
    (iq, cg), (cq, ig) = ann_index.search_vectors("PCMEpp", img.numpy(), cap.numpy())
    assert iq.shape == (5, 8) and cg.shape == (9, 8)
    np.testing.assert_allclose(iq.astype(np.float64) @ cg.T, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cq.astype(np.float64) @ ig.T, expected.T, rtol=0, atol=1e-5)
    assert (np.argsort(-(iq @ cg.T), 1, kind="stable") == np.argsort(-expected, 1, kind="stable")).all()


def test_pcmepp_shortlist_through_an_index(synth, any_main, tmp_path, one_thread):
    """--shortlist PCMEpp --shortlist_index hnsw end to end on 50 x 250: the index finds (nearly) all of the
    exact top 5 of -CSD; where it found all, the exact shortlist's metrics; K = the gallery = plain."""
    main = ["--model_path", any_main["VSE"], "--shortlist", any_main["PCMEpp"]]
    exact = _run(synth, tmp_path, *main, "--shortlist_k", "5")
    indexed = _run(synth, tmp_path, *main, "--shortlist_k", "5", "--shortlist_index", "hnsw")
    info = indexed["shortlist"]["index"]
    assert indexed["shortlist"]["module_name"] == "PCMEpp" and info["kind"] == "hnsw"
    assert info["i2t_recall"] >= 0.99 and info["t2i_recall"] >= 0.99
    if info["i2t_recall"] == info["t2i_recall"] == 1.0:
        for d in ("i2t", "t2i"):
            assert indexed[d] == exact[d]
    whole = _run(synth, tmp_path, *main, "--shortlist_k", "250", "--shortlist_index", "hnsw")
    plain = _run(synth, tmp_path, "--model_path", any_main["VSE"])
    for d in ("i2t", "t2i"):
        assert whole[d] == plain[d]


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_length_groups_score_as_a_block(synth, any_main, module):
    """An image needing more than scoring.GROUP_FROM captions (not a whole shard) is scored in groups of similar
    length: the same scores as similarity_block's to 1e-6, every needed pair once, the rest 0."""
    model, img_embs, caps, device = _encoded_testall(synth, any_main[module])
    split = scoring.EncodedSplit(model, img_embs, caps, 1000, device)
    rng = np.random.default_rng(4)
    need = np.zeros((50, 250), dtype=bool)
    need[3, rng.choice(250, 180, replace=False)] = True  # grouped
    need[7, rng.choice(250, 20, replace=False)] = True  # one call
    lengths = split.lengths.numpy()
    groups = scoring.length_groups(np.flatnonzero(need[3]), lengths)
    assert len(groups) > 1 and sorted(np.concatenate(groups).tolist()) == np.flatnonzero(need[3]).tolist()
    (block,) = evaluation.similarity_pairs(split, [((0, 50), (0, 250))], [need], 1000)
    full = evaluation.similarity_block(model, img_embs, caps, (0, 50), (0, 250), 1000, device)
    np.testing.assert_allclose(block[need], full[need], rtol=0, atol=1e-6)
    assert (block[~need] == 0).all()


def test_length_groups_by_hand():
    """Longest first; a group closes at a caption below 0.85 x its first once it holds `smallest`; fewer than
    GROUP_FROM captions: one group as given."""
    lengths = np.array([20, 10, 19, 9, 18, 17, 8, 16])
    groups = scoring.length_groups(np.arange(8), lengths, ratio=0.85, smallest=2, least=8)
    # 16 < 0.85 x 20 closes the first; 9 < 0.85 x 16 the second once it holds 2; the rest is the last
    assert [g.tolist() for g in groups] == [[0, 2, 4, 5], [7, 1], [3, 6]]
    assert len(scoring.length_groups(np.arange(8), lengths, ratio=0.85, smallest=2, least=9)) == 1
    assert [g.tolist() for g in scoring.length_groups(np.array([3, 1]), lengths)] == [[3, 1]]
    assert scoring.length_groups(np.array([], dtype=int), lengths) == []


def test_principal_directions_keep_the_energy():
    """ann_index.principal_directions against numpy's SVD of the centred data: the fewest right singular
    vectors whose squared singular values reach the energy; on data of rank 5 in 12 dimensions, 5 of them, and
    the projected inner products equal the full ones; a large shared offset does not take the energy."""
    import ann_index

    rng = np.random.default_rng(8)
    low = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 12))
    directions = ann_index.principal_directions(low, 0.999)
    assert directions.shape == (12, 5)
    np.testing.assert_allclose((low @ directions) @ (low[:7] @ directions).T, low @ low[:7].T, rtol=1e-4, atol=1e-3)
    full = rng.normal(size=(300, 12)) * np.linspace(3, 0.1, 12) + 50 * rng.normal(size=12)  # + a shared offset
    centred = full - full.mean(0)
    share = np.cumsum(np.linalg.svd(centred, compute_uv=False) ** 2) / (centred ** 2).sum()
    for energy in (0.5, 0.9, 0.99):
        r = ann_index.principal_directions(full, energy).shape[1]
        assert share[r - 1] >= energy - 1e-9 and (r == 1 or share[r - 2] < energy)


@pytest.mark.parametrize("kind", ["hnsw", "pca", "ivf"])
def test_index_recall_on_small_data(synth, any_main, tmp_path, one_thread, kind):
    """--shortlist_index on 50 x 250: the report gives the recall of the exact top K and the times; where the
    index found every exact candidate the metrics are the exact shortlist's; K = the gallery = plain."""
    main = ["--model_path", any_main["SGR"], "--shortlist", any_main["shortlist"]]
    exact = _run(synth, tmp_path, *main, "--shortlist_k", "5")
    indexed = _run(synth, tmp_path, *main, "--shortlist_k", "5", "--shortlist_index", kind)
    info = indexed["shortlist"]["index"]
    assert info["kind"] == kind and 0 < info["i2t_recall"] <= 1 and 0 < info["t2i_recall"] <= 1
    assert info["build_seconds"] > 0 and info["search_seconds"] > 0 and info["exact_seconds"] > 0
    assert "index" not in exact["shortlist"]
    if kind != "ivf":  # a graph over 50 or 250 points searched with ef = 160 visits most of them, pca scores
        # every item and re-scores its candidates; a caption the split holds twice ties with its copy, and the
        # index may return either (exact top K: the lower index)
        assert info["i2t_recall"] >= 0.99 and info["t2i_recall"] >= 0.99
    if info["i2t_recall"] == info["t2i_recall"] == 1.0:
        for d in ("i2t", "t2i"):
            assert indexed[d] == exact[d]
    whole = _run(synth, tmp_path, *main, "--shortlist_k", "250", "--shortlist_index", kind)
    plain = _run(synth, tmp_path, "--model_path", any_main["SGR"])
    assert whole["shortlist"]["index"]["i2t_recall"] == whole["shortlist"]["index"]["t2i_recall"] == 1.0
    for d in ("i2t", "t2i"):
        assert whole[d] == plain[d]


def test_shortlist_index_bad_inputs(synth, any_main, tmp_path, capsys):
    """An index over a model without one embedding per item, an index without --shortlist: one line, exit 2."""
    out = tmp_path / "never.json"
    main = ["--model_path", any_main["SGR"], "--json", str(out)]
    _expect_error(capsys, _argv(synth, *main, "--shortlist", any_main["SAF"], "--shortlist_k", "5",
                                "--shortlist_index", "hnsw"), out, any_main["SAF"], "--shortlist_index")
    _expect_error(capsys, _argv(synth, *main, "--shortlist_index", "ivf"), out, "--shortlist_index")
    _expect_error(capsys, _argv(synth, *main, "--shortlist", any_main["shortlist"], "--shortlist_k", "5",
                                "--shortlist_index", "flat"), out, "--shortlist_index")
    _expect_error(capsys, _argv(synth, *main, "--shortlist", any_main["shortlist"], "--shortlist_k", "0",
                                "--shortlist_index", "hnsw"), out, "--shortlist_k")
