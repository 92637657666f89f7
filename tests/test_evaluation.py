"""R@K, medr, meanr and ASP against brute-force loops; folds; the CLI in --sims and model mode; bad input."""
import json
import os
import warnings

import numpy as np
import pytest

import errors
import evaluation
import metrics
from tools.baselines.asp_sort import asp_loop, asp_sort
from tools.baselines.tfidf_dense import relevance_dense
from model import SimilarityModel

KEYS = ("r1", "r5", "r10", "medr", "meanr", "asp")


def brute_ranks(S):
    """R@K ranks by plain loops: i2t min over own captions c of #{distractors a: s >= s_c}; t2i #{a != j // 5: ...}."""
    n, n_cap = S.shape
    i2t = [min(sum(1 for a in range(n_cap) if a // 5 != i and S[i, a] >= S[i, c]) for c in range(5 * i, 5 * i + 5))
           for i in range(n)]
    t2i = [sum(1 for a in range(n) if a != j // 5 and S[a, j] >= S[j // 5, j]) for j in range(n_cap)]
    return np.array(i2t), np.array(t2i)


def brute_summary(ranks):
    """(r1, r5, r10, medr, meanr) of 0-based ranks; medr = 1 + the median rounded down (SCAN's floor)."""
    ranks = sorted(ranks)
    n = len(ranks)
    r = [100.0 * sum(x < k for x in ranks) / n for k in (1, 5, 10)]
    return (*r, float((ranks[(n - 1) // 2] + ranks[n // 2]) // 2 + 1), sum(ranks) / n + 1)


def brute_scores(S, M):
    """evaluation.score_matrix's dict from the loops: R@K, medr, meanr and ASP per direction, rsum."""
    ri, rt = brute_ranks(S)
    out = {"i2t": dict(zip(KEYS, brute_summary(ri) + (asp_loop(S, M),))),
           "t2i": dict(zip(KEYS, brute_summary(rt) + (asp_loop(S.T, M.T),)))}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def top_columns(S, k):
    """Each row's k best columns of S: descending score, ties by lower index (a tie at the cut: all its members
    considered)."""
    cut = -np.partition(-S, k - 1, axis=1)[:, k - 1]
    tops = []
    for row, kth in zip(np.ascontiguousarray(S), cut):
        candidates = np.flatnonzero(row >= kth)
        tops.append(candidates[np.lexsort((candidates, -row[candidates]))][:k])
    return tops


def assert_scores(report, expected):
    for d in ("i2t", "t2i"):
        for key in KEYS:
            assert report[d][key] == pytest.approx(expected[d][key], abs=1e-9), (d, key)
    assert report["rsum"] == pytest.approx(expected["rsum"], abs=1e-9)


@pytest.mark.parametrize("seed,levels,n", [(0, 3, 9), (1, 1000, 8), (2, 2, 9), (3, 4, 8)])
def test_recall_and_asp_against_loops(seed, levels, n, monkeypatch):
    """Odd and even numbers of queries (9 images and 45 captions; 8 and 40): the median needs its floor."""
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 50)  # many uneven chunks
    rng = np.random.default_rng(seed)
    S = rng.integers(0, levels, (n, 5 * n)).astype(np.float32)  # few levels: many ties
    M = rng.integers(0, 3, (n, 5 * n)).astype(np.float32)
    ri, rt = brute_ranks(S)
    assert (evaluation.i2t_ranks(S) == ri).all() and (evaluation.t2i_ranks(S) == rt).all()
    i2t, t2i = evaluation.i2t(S, M), evaluation.t2i(S, M)
    assert i2t[:5] == pytest.approx(brute_summary(ri)) and t2i[:5] == pytest.approx(brute_summary(rt))
    assert i2t[5] == pytest.approx(asp_loop(S, M), abs=1e-9)
    assert t2i[5] == pytest.approx(asp_loop(S.T, M.T), abs=1e-9)
    assert evaluation.i2t(S)[5] is None


def test_medr_rounds_the_median_down_and_meanr_is_the_mean_plus_1():
    """2 images, 10 captions (even counts): i2t ranks 0, 1 and t2i ranks five 0s, five 1s (0-based)."""
    S = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.6, 0.2, 0.2, 0.2, 0.2],
                  [0.8, 0.3, 0.3, 0.3, 0.3, 0.5, 0.4, 0.4, 0.4, 0.4]])
    assert evaluation.i2t_ranks(S).tolist() == [0, 1]
    assert evaluation.t2i_ranks(S).tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    for direction in (evaluation.i2t(S), evaluation.t2i(S)):
        assert direction[3:5] == (1.0, 1.5)
    assert evaluation.recall_summary(np.array([0, 3]))[3:] == (2.0, 2.5)  # median 1.5 -> 1, + 1
    assert evaluation.recall_summary(np.array([0, 3, 7]))[3:] == (4.0, 1 + 10 / 3)


def test_asp_sort_equals_average_rank_without_ties():
    rng = np.random.default_rng(4)
    S, M = rng.random((6, 30)), rng.random((6, 30))
    assert evaluation.asp(S, M) == pytest.approx(asp_sort(S, M), abs=1e-9)
    assert evaluation.asp(S, S) == pytest.approx(100.0)


def test_constant_matrix_scores_zero():
    scores = evaluation.score_matrix(np.full((4, 20), 0.5, dtype=np.float32), np.ones((4, 20), dtype=np.float32))
    assert scores["i2t"]["r1"] == 0.0 and scores["t2i"]["r1"] == 0.0
    assert scores["i2t"]["medr"] == 16.0 and scores["t2i"]["meanr"] == 4.0  # 15 distractors; 3 other images
    # Relevance all tied (average rank (n + 1) / 2 = 10.5), scores all tied (rank n = 20): 10.5 / 20.
    assert scores["i2t"]["asp"] == pytest.approx(52.5) and scores["t2i"]["asp"] == pytest.approx(100 * 2.5 / 4)
    # An image's own captions tied at the top is a hit: only distractors scoring >= count against it.
    tied_own = evaluation.score_matrix(np.repeat(np.eye(4), 5, axis=1))
    assert tied_own["i2t"]["r1"] == 100.0 and tied_own["i2t"]["medr"] == 1.0 and tied_own["t2i"]["r1"] == 100.0
    # A distractor tied with the best own caption is a miss.
    tied_other = np.repeat(np.eye(4), 5, axis=1)
    tied_other[0, 5] = 1.0
    assert evaluation.i2t_ranks(tied_other).tolist() == [1, 0, 0, 0]
    perfect = evaluation.score_matrix(np.repeat(np.eye(4), 5, axis=1) * (1 + np.arange(20) % 5))
    assert perfect["i2t"]["r1"] == 100.0 and perfect["t2i"]["r1"] == 100.0 and perfect["rsum"] == 600.0


def test_folds_are_block_means():
    rng = np.random.default_rng(5)
    S, M = rng.random((15, 75)), rng.random((15, 75))
    out = evaluation.score_folds(evaluation.fold_blocks(S), evaluation.fold_blocks(M))
    assert len(out["folds"]) == 5
    blocks = [evaluation.score_matrix(S[3 * f:3 * f + 3, 15 * f:15 * f + 15], M[3 * f:3 * f + 3, 15 * f:15 * f + 15])
              for f in range(5)]
    assert out["folds"] == blocks
    for d in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr", "meanr", "asp"):
            assert out[d][key] == pytest.approx(np.mean([b[d][key] for b in blocks]))
    assert out["rsum"] == pytest.approx(np.mean([b["rsum"] for b in blocks]))


def test_coco_recalls_equal_eccv_caption():
    """COCO 5K and 1K R@1/5/10 on a random (5000, 25000) matrix, ids of the real test split."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics
    metrics = Metrics()
    caption_ids = metrics.coco_ids
    image_ids = np.array([metrics.coco_gts["t2i"][int(c)][0] for c in caption_ids[::5]])
    S = np.random.default_rng(6).random((5000, 25000), dtype=np.float32)
    ours_5k = evaluation.score_matrix(S)
    i2t_idx, _, t2i_idx, _ = evaluation.topk_rankings(S, 10)
    items = {"i2t": {int(image_ids[i]): caption_ids[r].tolist() for i, r in enumerate(i2t_idx)},
             "t2i": {int(caption_ids[j]): image_ids[r].tolist() for j, r in enumerate(t2i_idx)}}
    ours_1k = evaluation.score_folds(evaluation.fold_blocks(S))
    items_1k = {"i2t": {}, "t2i": {}}  # each query ranks its own fold's block (the package filters to it)
    for lo, hi in evaluation.fold_bounds(5000):
        bi, _, bt, _ = evaluation.topk_rankings(S[lo:hi, 5 * lo:5 * hi], 10)
        items_1k["i2t"].update({int(image_ids[lo + i]): caption_ids[5 * lo + r].tolist() for i, r in enumerate(bi)})
        items_1k["t2i"].update({int(caption_ids[5 * lo + j]): image_ids[lo + r].tolist() for j, r in enumerate(bt)})
    for k in (1, 5, 10):
        theirs = metrics.coco_5k_recalls(items, "all", K=k)
        assert ours_5k["i2t"][f"r{k}"] == pytest.approx(100 * theirs["i2t"])
        assert ours_5k["t2i"][f"r{k}"] == pytest.approx(100 * theirs["t2i"])
        theirs_1k = metrics.coco_1k_recalls(items_1k, "all", K=k)
        assert ours_1k["i2t"][f"r{k}"] == pytest.approx(100 * theirs_1k["i2t"])
        assert ours_1k["t2i"][f"r{k}"] == pytest.approx(100 * theirs_1k["t2i"])


# ------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def caps_dir(tmp_path):
    """A split of 10 images with word-overlapping captions (only the captions file: --sims mode needs no features)."""
    rng = np.random.default_rng(7)
    words = "a dog cat man woman red blue runs sits on the grass street ball".split()
    lines = [" ".join(rng.choice(words, 6)) for _ in range(50)]
    (tmp_path / "toy_precomp").mkdir()
    (tmp_path / "toy_precomp" / "test_caps.txt").write_text("\n".join(lines) + "\n")
    S = rng.random((10, 50)).astype(np.float32)
    np.save(tmp_path / "s1.npy", S)
    return tmp_path


def _sims_argv(d, *extra):
    return ["--data_path", str(d), "--data_name", "toy_precomp", "--split", "test", *extra]


def test_sims_mode_json(caps_dir):
    """Two --sims are averaged (the saved matrix is their mean); whole split and --fold5 against the loops,
    each fold scored with its own block of the relevance fit on the whole split."""
    from daa_loss import SemanticRelevance

    S1, S2 = np.load(caps_dir / "s1.npy"), np.random.default_rng(8).random((10, 50)).astype(np.float32)
    np.save(caps_dir / "s2.npy", S2)
    out, saved = caps_dir / "out.json", caps_dir / "mean.npy"
    argv = _sims_argv(caps_dir, "--sims", str(caps_dir / "s1.npy"), "--sims", str(caps_dir / "s2.npy"),
                      "--json", str(out))
    assert errors.run(evaluation.main, argv + ["--save_sims", str(saved)]) == 0
    report = json.loads(out.read_text())
    assert {"split", "fold5", "n_images", "n_captions", "i2t", "t2i", "rsum", "provenance"} <= set(report)
    assert report["n_images"] == 10 and report["n_captions"] == 50 and report["fold5"] is False
    assert set(report["i2t"]) == set(KEYS)
    mean = (S1 + S2) / 2
    np.testing.assert_array_equal(np.load(saved), mean)
    M = SemanticRelevance((caps_dir / "toy_precomp" / "test_caps.txt").read_text().splitlines()).matrix()
    assert_scores(report, brute_scores(mean, M))
    assert report["provenance"]["sims"] == [str(caps_dir / "s1.npy"), str(caps_dir / "s2.npy")]
    # --fold5: five folds of 2 images, and their means at the top level
    assert errors.run(evaluation.main, argv + ["--fold5"]) == 0
    folds = json.loads(out.read_text())
    assert folds["fold5"] is True and len(folds["folds"]) == 5
    for f, fold in enumerate(folds["folds"]):
        block = np.s_[2 * f:2 * f + 2, 10 * f:10 * f + 10]
        assert_scores(fold, brute_scores(mean[block], M[block]))
    for d in ("i2t", "t2i"):
        for key in KEYS:
            assert folds[d][key] == pytest.approx(np.mean([f[d][key] for f in folds["folds"]]))


def test_asp_gives_no_credit_for_ties(synth, tmp_path):
    """On the synthetic testall: a constant matrix scores ASP about 50 (like random scores), the relevance 100."""
    from daa_loss import SemanticRelevance

    captions = (open(os.path.join(synth.coco_root, "testall_caps.txt"), encoding="utf-8").read().splitlines())
    M = SemanticRelevance(captions).matrix()
    n_img, n_cap = M.shape
    argv = ["--data_path", synth.data_path, "--data_name", "coco_precomp", "--split", "testall", "--json",
            str(tmp_path / "out.json")]
    results = {}
    for name, S in (("constant", np.full((n_img, n_cap), 0.5, np.float32)), ("relevance", M),
                    ("random", np.random.default_rng(0).random((n_img, n_cap)).astype(np.float32))):
        np.save(tmp_path / f"{name}.npy", S)
        assert errors.run(evaluation.main, argv + ["--sims", str(tmp_path / f"{name}.npy")]) == 0
        results[name] = json.loads((tmp_path / "out.json").read_text())
    for d in ("i2t", "t2i"):
        assert results["constant"][d]["asp"] == pytest.approx(50, abs=1)
        assert results["random"][d]["asp"] == pytest.approx(50, abs=2)
        assert results["relevance"][d]["asp"] > 99.9  # 100 but for the few ties within M itself
        assert results["constant"][d]["r1"] == 0.0
    distinct = np.random.default_rng(1).random((6, 30))
    assert evaluation.asp(distinct, distinct) == 100.0


def _expect_error(capsys, argv, out, name, also=None):
    assert errors.run(evaluation.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0], err
    if also:
        assert also in err[0]
    assert not os.path.exists(out)


def test_sims_mode_bad_inputs(caps_dir, capsys):
    out = caps_dir / "never.json"
    S = np.load(caps_dir / "s1.npy")
    cases = {"wrong.npy": np.zeros((10, 45)), "transposed.npy": S.T,
             "nan.npy": np.where(S > 0.9, np.nan, S), "inf.npy": np.where(S > 0.9, np.inf, S)}
    for name, array in cases.items():
        np.save(caps_dir / name, array)
        _expect_error(capsys, _sims_argv(caps_dir, "--sims", str(caps_dir / name), "--json", str(out)), out, name,
                      "transposed" if name == "transposed.npy" else None)
    (caps_dir / "text.npy").write_text("hello")
    _expect_error(capsys, _sims_argv(caps_dir, "--sims", str(caps_dir / "text.npy"), "--json", str(out)), out,
                  "text.npy")
    _expect_error(capsys, _sims_argv(caps_dir, "--sims", str(caps_dir / "absent.npy"), "--json", str(out)), out,
                  "absent.npy")
    argv = ["--data_path", str(caps_dir), "--data_name", "toy_precomp", "--split", "dev",
            "--sims", str(caps_dir / "s1.npy"), "--json", str(out)]
    _expect_error(capsys, argv, out, "dev_caps.txt")


# ------------------------------------------------------------------------------------------------
# Model mode on the synthetic dataset


def _tiny_checkpoint(synth, path, module_name, seed):
    import torch

    import checkpoint
    import opts
    import vocab as vocab_lib
    from model import SimilarityModel

    vocab = vocab_lib.deserialize_vocab(os.path.join(synth.vocab_path, "coco_precomp_vocab.json"))
    opt = opts.parse_opt(["--data_path", synth.data_path, "--data_name", "coco_precomp", "--vocab_path",
                          synth.vocab_path, "--img_dim", str(synth.feat_dim), "--word_dim", "8", "--embed_size",
                          "16", "--sim_dim", "8", "--module_name", module_name, "--sgr_step", "1"])
    torch.manual_seed(seed)
    opt.vocab_size = len(vocab)
    model = SimilarityModel(opt)
    checkpoint.save_checkpoint({"epoch": 0, "model": model.state_dicts(), "best_rsum": 0.0, "opt": opt, "Eiters": 0},
                               path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpts(synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return (_tiny_checkpoint(synth, str(d / "sgr.pth.tar"), "SGR", 0),
            _tiny_checkpoint(synth, str(d / "saf.pth.tar"), "SAF", 1))


def test_model_mode_end_to_end(synth, tiny_ckpts, tmp_path):
    sgr, saf = tiny_ckpts
    sims1, sims2, out = tmp_path / "sgr.npy", tmp_path / "saf.npy", tmp_path / "out.json"
    base = ["--vocab_path", synth.vocab_path, "--split", "testall", "--batch_size", "32", "--device", "cpu"]
    # several shards of images x captions, not aligned with the caption batches
    assert errors.run(evaluation.main, ["--model_path", sgr, "--save_sims", str(sims1), "--json", str(out),
                                        "--shard_size", "40"] + base) == 0
    report = json.loads(out.read_text())
    n = synth.sizes["testall"]
    S1 = np.load(sims1)
    assert S1.shape == (n, 5 * n) and report["n_images"] == n
    assert report["provenance"]["checkpoint"] == [sgr] and report["provenance"]["opt"][0]["module_name"] == "SGR"
    # --sims mode on the saved matrix gives the same numbers
    out2 = tmp_path / "again.json"
    assert errors.run(evaluation.main, ["--sims", str(sims1), "--data_path", synth.data_path, "--data_name",
                                        "coco_precomp", "--split", "testall", "--json", str(out2)]) == 0
    again = json.loads(out2.read_text())
    assert again["i2t"] == report["i2t"] and again["t2i"] == report["t2i"]
    from daa_loss import SemanticRelevance

    M = SemanticRelevance(open(os.path.join(synth.coco_root, "testall_caps.txt"), encoding="utf-8")
                          .read().splitlines()).matrix()
    assert_scores(report, evaluation.score_matrix(S1, M))  # the relevance of the whole testall split
    # SGRAF: two checkpoints = the mean of their matrices; --fold5 alone scores only the diagonal blocks
    assert errors.run(evaluation.main, ["--model_path", saf, "--save_sims", str(sims2)] + base) == 0
    mean = (S1 + np.load(sims2)) / 2
    ranks, ens_sims = tmp_path / "ranks.jsonl", tmp_path / "sgraf.npy"
    assert errors.run(evaluation.main, ["--model_path", sgr, "--model_path2", saf, "--fold5", "--json", str(out),
                                        "--save_ranks", str(ranks), "--topk", "3", "--save_sims", str(ens_sims)]
                      + base) == 0
    ens = json.loads(out.read_text())
    S = np.load(ens_sims)
    np.testing.assert_allclose(S, mean, rtol=0, atol=1e-6)  # the average of the two, not their sum
    assert ens["fold5"] is True and len(ens["folds"]) == 5
    for f, fold in enumerate(ens["folds"]):  # R@K and ASP of each 10-image fold, M's block of the fold
        block = np.s_[10 * f:10 * f + 10, 50 * f:50 * f + 50]
        assert_scores(fold, brute_scores(S[block], M[block]))
    for d in ("i2t", "t2i"):
        for key in KEYS:
            assert ens[d][key] == pytest.approx(np.mean([fold[d][key] for fold in ens["folds"]]))
    assert_scores(ens["all"], evaluation.score_matrix(S, M))  # --save_sims needs the whole matrix: 5K too
    # --save_ranks: every line, i2t (image rows) then t2i (caption columns), against the top 3 ranked here
    lines = [json.loads(line) for line in ranks.read_text().splitlines()]
    expected = [("i2t", q, top, S[q, top]) for q, top in enumerate(top_columns(S, 3))]
    expected += [("t2i", q, top, S[top, q]) for q, top in enumerate(top_columns(S.T, 3))]
    assert len(lines) == len(expected) == n + 5 * n
    for line, (direction, q, top, values) in zip(lines, expected):
        assert line == {"direction": direction, "query": q, "topk": top.tolist(), "scores": values.tolist()}, line
    out3 = tmp_path / "fold_only.json"
    assert errors.run(evaluation.main, ["--model_path", sgr, "--model_path2", saf, "--fold5", "--json", str(out3)]
                      + base) == 0
    fold_only = json.loads(out3.read_text())
    assert "all" not in fold_only  # the same blocks scored without the rest of the matrix: the same numbers
    assert_scores(fold_only, ens)


def test_model_mode_vocab_mismatch(synth, tiny_ckpts, tmp_path, capsys):
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    words = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4}
    (vocab_dir / "coco_precomp_vocab.json").write_text(json.dumps(
        {"word2idx": words, "idx2word": {str(i): w for w, i in words.items()}, "idx": 5}))
    out = tmp_path / "never.json"
    _expect_error(capsys, ["--model_path", tiny_ckpts[0], "--vocab_path", str(vocab_dir), "--split", "testall",
                           "--device", "cpu", "--json", str(out)], out, tiny_ckpts[0])


def test_validation_scores_the_model_on_the_dev_cut(synth, tiny_ckpts):
    """What training's validation reports, against the model's own matrix (one forward over every pair of
    the first 10 dev images) scored by the loops with the dense TF-IDF of those 50 captions."""
    import checkpoint
    import data
    import torch
    import vocab as vocab_lib

    vocab = vocab_lib.deserialize_vocab(os.path.join(synth.vocab_path, "coco_precomp_vocab.json"))
    model = SimilarityModel.from_checkpoint(checkpoint.load_checkpoint(tiny_ckpts[0]), tiny_ckpts[0], len(vocab))
    images, captions, dataset = data.get_eval_loaders(synth.data_path, "coco_precomp", "dev", vocab, 16, 0,
                                                      max_captions=50)
    metrics = evaluation.validate(model, images, captions, dataset.relevance, "cpu")
    all_images = torch.stack([dataset.image(i) for i in range(10)])
    padded, lengths = data.pad_captions([dataset.caption(j) for j in range(50)])
    with torch.no_grad():
        S = model.eval()(all_images, padded, lengths).numpy()
    captions_text = data.read_captions(synth.data_path, "coco_precomp", "dev")[:50]
    assert set(metrics) == {"i2t", "t2i", "rsum"}
    assert_scores(metrics, brute_scores(S, relevance_dense(captions_text).astype(np.float32)))


def test_a_lost_peer_under_torchrun_is_one_line(synth, tiny_ckpts, tmp_path, monkeypatch, capsys):
    """evaluation.py under torchrun (here a group of one, env:// as torchrun sets it up): a collective that
    fails because a peer is gone is one line, exit 3, as train.py's (distributed.lost_peer_exits serves both),
    not a traceback from inside torch.distributed; nothing is written. gloo's own message is what is raised."""
    import torch.distributed as dist

    import distributed

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(distributed.free_port()))):
        monkeypatch.setenv(name, value)

    def peer_gone(args, argv):
        assert dist.is_initialized()
        raise dist.DistBackendError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500\n"
                                    "Exception raised from recvBytes")

    def exit_now(code):  # os._exit would end pytest
        raise SystemExit(code)

    monkeypatch.setattr(evaluation, "evaluate", peer_gone)
    monkeypatch.setattr(distributed.os, "_exit", exit_now)
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_:
        evaluation.main(["--model_path", tiny_ckpts[0], "--vocab_path", synth.vocab_path, "--split", "testall",
                         "--device", "cpu", "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 3 and len(err) == 1, err
    assert err[0] == ("error: rank 0: lost contact with another evaluation process ([gloo/transport/tcp/pair.cc:534] "
                      "Connection closed by peer [127.0.0.1]:29500)")
    assert not out.exists() and not dist.is_initialized()


def test_data_name_must_be_the_checkpoints(synth, tiny_ckpts, capsys, tmp_path):
    """--data_name with --model_path: the checkpoint's data name decides which dataset is scored, so another one
    is refused (one line, nothing written) instead of being silently ignored; the checkpoint's own is accepted."""
    out = tmp_path / "never.json"
    base = ["--model_path", tiny_ckpts[0], "--vocab_path", synth.vocab_path, "--split", "testall", "--device", "cpu"]
    _expect_error(capsys, base + ["--data_name", "f30k_precomp", "--json", str(out)], out,
                  "--data_name f30k_precomp: ", also="was trained on coco_precomp")
    same = tmp_path / "same.json"
    assert errors.run(evaluation.main, base + ["--data_name", "coco_precomp", "--json", str(same)]) == 0
    assert json.loads(same.read_text())["provenance"]["data_name"] == "coco_precomp"


def test_eccv_needs_testall(synth, tiny_ckpts, capsys, tmp_path):
    out = tmp_path / "never.json"
    _expect_error(capsys, ["--model_path", tiny_ckpts[0], "--vocab_path", synth.vocab_path, "--split", "testall",
                           "--eccv", "--device", "cpu", "--json", str(out)], out, "testall")


def test_eccv_scores_on_the_real_test_ids(tmp_path):
    """--eccv's mapping: rows -> testall_ids.txt, columns -> the package's caption ids (or ids matched by text)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics
    metrics = Metrics()
    caption_ids = metrics.coco_ids
    image_ids = [metrics.coco_gts["t2i"][int(c)][0] for c in caption_ids]
    split = tmp_path / "coco_precomp"
    split.mkdir()
    (split / "testall_ids.txt").write_text("".join(f"{i}\n" for i in image_ids))
    (split / "testall_caps.txt").write_text("".join(f"caption {c}\n" for c in caption_ids))
    # captions_val2014.json naming the first image's captions in another order: matched by text
    first = [int(c) for c in caption_ids[:5]]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": [
        {"id": c, "image_id": image_ids[0], "caption": f"Caption {c}."} for c in first]}))
    S = np.random.default_rng(9).random((5000, 25000), dtype=np.float32)
    out = evaluation.eccv_scores(S, str(tmp_path), "coco_precomp", "testall", str(tmp_path))
    ours = evaluation.score_matrix(S)
    for k in (1, 5, 10):
        assert out[f"coco_5k_r{k}"]["i2t"] == pytest.approx(ours["i2t"][f"r{k}"])
        assert out[f"coco_5k_r{k}"]["t2i"] == pytest.approx(ours["t2i"][f"r{k}"])
    assert "0 unmatched" not in out["caption_ids"] and "24995 unmatched" in out["caption_ids"]
    # Every value against the package called directly on the same matrix, ranked here (the text-matched ids
    # are the package's own): each query's top 64 (above the 48 positives of the largest ECCV query, so a
    # ranking cut too short in the adapter would change mAP@R and R-P), descending score, ties by lower index.
    rows = [int(i) for i in image_ids[::5]]
    i2t_items = {rows[i]: [int(caption_ids[j]) for j in top] for i, top in enumerate(top_columns(S, 64))}
    t2i_items = {int(caption_ids[j]): [rows[i] for i in top] for j, top in enumerate(top_columns(S.T, 64))}
    names = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_5k_recalls")
    theirs = Metrics().compute_all_metrics(i2t_items, t2i_items, target_metrics=names, Ks=(1, 5, 10), verbose=False)
    assert set(out) == set(theirs) | {"caption_ids"}
    assert {"eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "cxc_r5", "cxc_r10"} <= set(out)
    for name, value in theirs.items():
        for d in ("i2t", "t2i"):
            assert out[name][d] == pytest.approx(100 * value[d], abs=1e-9), (name, d)
    assert 0 < out["eccv_map_at_r"]["i2t"] < 5  # random scores: far from perfect, not zero
    # ids that do not agree with the package's test split
    (split / "testall_ids.txt").write_text("".join(f"{i + 1}\n" for i in image_ids))
    with pytest.raises(errors.InputError, match="testall_ids.txt"):
        evaluation.eccv_scores(S, str(tmp_path), "coco_precomp", "testall", str(tmp_path / "none"))
