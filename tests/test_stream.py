"""evaluation.py --stream: the in-memory report, chunk of query rows by chunk (one model, an SGRAF pair, --fold5,
--sims files, tied scores); the chunked --save_sims file; --max_matrix_gb streaming by itself; bad input."""
import json

import numpy as np
import pytest

import errors
import evaluation
import metrics
import scoring
from tests.test_evaluation import KEYS, _expect_error, _tiny_checkpoint, brute_scores


@pytest.fixture(scope="module")
def models(synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_ckpt")
    return {name: _tiny_checkpoint(synth, str(d / f"{name}.pth.tar"), module, seed)
            for name, module, seed in (("sgr", "SGR", 0), ("saf", "SAF", 1), ("vse", "VSE", 2))}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one shard of rows (the least a chunk holds), many in every direction and fold; their relevance
    rows computed a few at a time."""
    monkeypatch.setattr(scoring, "STREAM_CHUNK_BYTES", 1)
    monkeypatch.setattr(scoring, "RELEVANCE_PIECE", 100)  # relevance rows in pieces of a few rows


def _run(argv, out):
    assert errors.run(evaluation.main, argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def assert_same_report(streamed, in_memory):
    """Every key but the provenance; R@K, medr, meanr, rsum exactly, ASP within 1e-6 (the chunks' float sums
    are added in another order)."""
    assert set(streamed) == set(in_memory)
    blocks = [(streamed, in_memory)] + list(zip(streamed.get("folds", []), in_memory.get("folds", [])))
    if "all" in in_memory:
        blocks.append((streamed["all"], in_memory["all"]))
    for s, m in blocks:
        for d in ("i2t", "t2i"):
            for key in KEYS:
                if key == "asp" and m[d][key] is not None:
                    assert s[d][key] == pytest.approx(m[d][key], abs=1e-6), (d, key)
                else:
                    assert s[d][key] == m[d][key], (d, key)
        assert s["rsum"] == m["rsum"]
    for key in set(in_memory) - {"i2t", "t2i", "rsum", "folds", "all", "provenance"}:
        assert streamed[key] == in_memory[key], key


def _model_argv(synth, *extra):
    return ["--vocab_path", synth.vocab_path, "--split", "testall", "--batch_size", "32", "--device", "cpu", *extra]


@pytest.mark.parametrize("main", ["one model", "SGRAF pair", "VSE"])
@pytest.mark.parametrize("fold5", [False, True], ids=["5K", "1K"])
def test_stream_equals_in_memory(synth, models, tmp_path, one_thread, small_chunks, main, fold5):
    """Shards of 8 images / captions: 50 images and 250 captions in 7 and 32 chunks of 8 rows (a fold: 2 and 7)."""
    paths = {"one model": ["--model_path", models["sgr"]], "VSE": ["--model_path", models["vse"]],
             "SGRAF pair": ["--model_path", models["sgr"], "--model_path2", models["saf"]]}[main]
    argv = _model_argv(synth, *paths, "--shard_size", "8", *(["--fold5"] if fold5 else []))
    in_memory = _run(argv, tmp_path / "memory.json")
    streamed = _run(argv + ["--stream"], tmp_path / "stream.json")
    assert_same_report(streamed, in_memory)


def test_stream_saves_the_matrix_chunk_by_chunk(synth, models, tmp_path, one_thread, small_chunks, capsys):
    """--save_sims --stream: the .npy memory map written chunk by chunk is byte for byte the in-memory one; with
    --fold5 the report has the folds and "all", as in memory (both from the saved matrix's entries)."""
    argv = _model_argv(synth, "--model_path", models["sgr"], "--model_path2", models["saf"], "--shard_size", "16",
                       "--fold5")
    in_memory = _run(argv + ["--save_sims", str(tmp_path / "memory.npy")], tmp_path / "memory.json")
    capsys.readouterr()
    streamed = _run(argv + ["--save_sims", str(tmp_path / "stream.npy"), "--stream"], tmp_path / "stream.json")
    assert "saved the (50, 250) similarity matrix" in capsys.readouterr().out
    assert (tmp_path / "stream.npy").read_bytes() == (tmp_path / "memory.npy").read_bytes()
    assert "all" in streamed
    assert_same_report(streamed, in_memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json", "memory.npy", "stream.json", "stream.npy"]


@pytest.mark.parametrize("levels", [3, None], ids=["tied scores", "continuous"])
def test_stream_of_saved_matrices(synth, tmp_path, small_chunks, levels):
    """--sims read by memory map: two files averaged (one float64), few score levels (ties everywhere: R@K's
    distractor ties and ASP's last-rank ties), whole split and folds; the in-memory report against the loops too."""
    n = synth.sizes["testall"]
    rng = np.random.default_rng(3)
    first = (rng.integers(0, levels, (n, 5 * n)) if levels else rng.random((n, 5 * n))).astype(np.float32)
    second = (rng.integers(0, levels, (n, 5 * n)) if levels else rng.random((n, 5 * n))).astype(np.float64)
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "b.npy", second)
    argv = ["--sims", str(tmp_path / "a.npy"), "--sims", str(tmp_path / "b.npy"), "--data_path", synth.data_path,
            "--data_name", "coco_precomp", "--split", "testall"]
    for fold5 in ([], ["--fold5"]):
        in_memory = _run(argv + fold5, tmp_path / "memory.json")
        streamed = _run(argv + fold5 + ["--stream"], tmp_path / "stream.json")
        assert_same_report(streamed, in_memory)
    from daa_loss import SemanticRelevance
    captions = open(f"{synth.coco_root}/testall_caps.txt", encoding="utf-8").read().splitlines()
    expected = brute_scores((first + second) / 2, SemanticRelevance(captions).matrix())
    whole = _run(argv + ["--stream"], tmp_path / "stream.json")
    for d in ("i2t", "t2i"):
        for key in KEYS:
            assert whole[d][key] == pytest.approx(expected[d][key], abs=1e-6), (d, key)


def test_chunks_give_the_whole_matrix_metrics(monkeypatch):
    """metrics.score_chunks from uneven chunks in shuffled order (each direction its own) = score_matrix."""
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 40)
    rng = np.random.default_rng(11)
    S = rng.integers(0, 4, (9, 45)).astype(np.float32)
    M = rng.integers(0, 3, (9, 45)).astype(np.float32)
    cuts_i, cuts_t = [0, 2, 3, 7, 9], [0, 11, 12, 30, 45]
    i2t_chunks = [(a, S[a:b], M[a:b]) for a, b in zip(cuts_i, cuts_i[1:])][::-1]
    t2i_chunks = [(a, S[:, a:b].T, M[:, a:b].T) for a, b in zip(cuts_t, cuts_t[1:])][::-1]
    streamed = metrics.score_chunks(i2t_chunks, t2i_chunks, 9, 45)
    whole = metrics.score_matrix(S, M)
    for d in ("i2t", "t2i"):
        for key in KEYS:
            assert streamed[d][key] == pytest.approx(whole[d][key], abs=1e-12)
    with pytest.raises(ValueError):
        metrics.score_chunks(i2t_chunks[1:], t2i_chunks, 9, 45)  # a chunk missing


def test_max_matrix_gb_streams_by_itself(synth, models, tmp_path, one_thread, capsys):
    """Over --max_matrix_gb evaluation says it streams and gives the same report; an option that needs the
    whole matrix keeps it in memory and says so."""
    argv = _model_argv(synth, "--model_path", models["vse"])
    in_memory = _run(argv, tmp_path / "memory.json")
    capsys.readouterr()
    streamed = _run(argv + ["--max_matrix_gb", "1e-5"], tmp_path / "auto.json")
    out = capsys.readouterr().out
    assert "streaming: the (50, 250) score matrix" in out and "--max_matrix_gb" in out
    assert_same_report(streamed, in_memory)
    _run(argv + ["--max_matrix_gb", "1e-5", "--save_ranks", str(tmp_path / "ranks.jsonl")], tmp_path / "ranks.json")
    assert "evaluating in memory" in capsys.readouterr().out
    _run(argv + ["--max_matrix_gb", "100"], tmp_path / "big.json")
    assert "streaming" not in capsys.readouterr().out


def test_stream_bad_inputs(synth, models, tmp_path, capsys):
    """Options --stream cannot honour, a non-positive --max_matrix_gb: one line, exit 2, nothing written."""
    out, saved = tmp_path / "never.json", tmp_path / "never.npy"
    argv = _model_argv(synth, "--model_path", models["vse"], "--json", str(out))
    for extra, name in ((["--save_ranks", str(tmp_path / "r.jsonl")], "--save_ranks"),
                        (["--eccv", "--save_sims", str(saved)], "--eccv"), (["--world_size", "2"], "--world_size"),
                        (["--shortlist", models["vse"], "--shortlist_k", "5"], "--shortlist")):
        _expect_error(capsys, argv + ["--stream"] + extra, out, name, "--stream")
        assert not saved.exists() and not (tmp_path / "r.jsonl").exists()
    for value in ("0", "-1", "nan"):
        _expect_error(capsys, argv + ["--max_matrix_gb", value], out, "--max_matrix_gb")
    assert sorted(tmp_path.iterdir()) == []


def test_default_limit_comes_from_available_memory(synth, models, tmp_path, one_thread, capsys, monkeypatch):
    """Without --max_matrix_gb the limit is the memory available divided by the matrices the in-memory path
    holds (an SGRAF pair: two, their mean, the relevance): little memory left streams by itself."""
    argv = _model_argv(synth, "--model_path", models["sgr"], "--model_path2", models["saf"])
    monkeypatch.setattr(evaluation, "available_gb", lambda: 4 * 0.9 * 50 * 250 * 4 / 2 ** 30)  # 0.9 matrix each
    _run(argv, tmp_path / "auto.json")
    out = capsys.readouterr().out
    assert "streaming: the (50, 250) score matrix" in out and f"--max_matrix_gb {0.9 * 50 * 250 * 4 / 2 ** 30:.2f}" in out
    monkeypatch.setattr(evaluation, "available_gb", lambda: 4 * 1.1 * 50 * 250 * 4 / 2 ** 30)
    _run(argv, tmp_path / "memory.json")
    assert "streaming" not in capsys.readouterr().out
