"""PMRP: the vectorised pmrp_com against PCME's dict-based algorithm (baselines/pmrp_dict.py), CLI, bad input."""
import json
import os

import numpy as np
import pytest

import errors
import pmrp_evaluation
from tools.baselines.pmrp_dict import pmrp_dict
from pmrp_com import pmrp


def write_annotations(path, image_ids, rng, n_categories=6, empty_share=0.2, extra_images=3):
    """A tiny COCO instances file: each image gets 0..3 instances of a few categories (many equal codes).

    Returns {image_id: 90-list multi-hot code}.
    """
    categories = rng.choice(np.arange(1, 91), n_categories, replace=False)
    images = [{"id": int(i), "file_name": f"{i}.jpg"} for i in image_ids]
    images += [{"id": 10 ** 7 + k} for k in range(extra_images)]  # images not in the split
    annotations, codes = [], {}
    for image_id in list(image_ids) + [10 ** 7]:
        code = [0] * 90
        n = 0 if rng.random() < empty_share else int(rng.integers(1, 4))
        for _ in range(n):
            cat = int(rng.choice(categories))
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": cat})
            code[cat - 1] = 1
        codes[int(image_id)] = code
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": int(c), "name": str(c)} for c in categories]}, f)
    return codes


@pytest.fixture
def pmrp_case(tmp_path):
    """20 images (5 folds of 4), integer-valued scores (many ties), annotations, testall_ids.txt."""
    rng = np.random.default_rng(0)
    n = 20
    image_ids = rng.choice(np.arange(1, 600000), n, replace=False)
    ann_root = tmp_path / "ann"
    ann_root.mkdir()
    codes = write_annotations(ann_root / "instances_val2014.json", image_ids, rng)
    (tmp_path / "testall_ids.txt").write_text("".join(f"{i}\n" for i in np.repeat(image_ids, 5)))
    sims = rng.integers(0, 6, (n, 5 * n)).astype(np.float32)
    np.save(tmp_path / "sims.npy", sims)
    return {"dir": tmp_path, "ann_root": ann_root, "image_ids": image_ids, "codes": codes, "sims": sims}


def assert_same(fast, slow):
    assert fast["n_fold"] == slow["n_fold"]
    for d in ("i2t", "t2i"):
        assert fast[d]["pmrp"] == pytest.approx(slow[d]["pmrp"], abs=1e-9)
        assert fast[d]["pmr1"] == pytest.approx(slow[d]["pmr1"], abs=1e-9)
        assert set(fast[d]["pmrp_thres"]) == set(slow[d]["pmrp_thres"])
        for t in fast[d]["pmrp_thres"]:
            assert fast[d]["pmrp_thres"][t] == pytest.approx(slow[d]["pmrp_thres"][t], abs=1e-9)


@pytest.mark.parametrize("n_fold", [5, 0])
@pytest.mark.parametrize("max_thres", [1, 3])
def test_matches_pcme_dict(pmrp_case, n_fold, max_thres, monkeypatch):
    monkeypatch.setattr(pmrp, "CHUNK_ELEMENTS", 37)  # several chunks of rows in each direction
    case = pmrp_case
    ids = case["image_ids"]
    codes = pmrp.instance_codes(case["ann_root"] / "instances_val2014.json", ids)
    assert (codes == np.array([case["codes"][int(i)] for i in ids])).all()
    assert not codes.all(1).any() and (~codes.any(1)).any()  # some images are dropped
    fast = pmrp.pmrp_scores(case["sims"], codes, n_fold, max_thres)
    slow = pmrp_dict(case["sims"], ids, case["codes"], n_fold, max_thres)
    assert_same(fast, slow)
    assert set(fast["i2t"]["pmrp_thres"]) == {str(t) for t in range(max_thres)}


def test_continuous_scores_and_more_images(tmp_path):
    rng = np.random.default_rng(3)
    ids = np.arange(1, 41) * 7
    codes_dict = write_annotations(tmp_path / "inst.json", ids, rng, n_categories=4, empty_share=0.1)
    codes = pmrp.instance_codes(tmp_path / "inst.json", ids)
    sims = rng.random((40, 200))
    for n_fold in (5, 0):
        assert_same(pmrp.pmrp_scores(sims, codes, n_fold), pmrp_dict(sims, ids, codes_dict, n_fold))


def test_perfect_and_constant_rankings():
    """Ranking own captions first, then by code distance -> PMRP 100 at threshold 0 where codes are unique."""
    codes = np.zeros((5, 90), dtype=np.uint8)
    for i in range(5):
        codes[i, i] = 1  # all codes different: plausible at threshold 0 = own image only
    sims = np.repeat(np.eye(5), 5, axis=1)
    out = pmrp.pmrp_scores(sims, codes, n_fold=0, max_thres=1)
    assert out["i2t"]["pmrp"] == 100.0 and out["t2i"]["pmrp"] == 100.0 and out["i2t"]["pmr1"] == 100.0
    # A constant matrix ranks by index (stable): image 0's captions come first for every query.
    flat = pmrp.pmrp_scores(np.zeros((5, 25)), codes, n_fold=0, max_thres=1)
    assert flat["t2i"]["pmr1"] == pytest.approx(100 * 5 / 25)
    assert flat["i2t"]["pmrp"] == pytest.approx(100 * 1 / 5)


def test_cli_json_and_average(pmrp_case):
    case = pmrp_case
    out = case["dir"] / "out.json"
    sims2 = np.random.default_rng(1).random(case["sims"].shape).astype(np.float32)
    np.save(case["dir"] / "sims2.npy", sims2)
    argv = ["--path1", str(case["dir"] / "sims.npy"), "--path2", str(case["dir"] / "sims2.npy"), "--n_fold", "5",
            "--dataset_root", str(case["dir"]), "--ann_root", str(case["ann_root"]), "--json", str(out)]
    assert errors.run(pmrp_evaluation.main, argv) == 0
    result = json.loads(out.read_text())
    assert result["n_fold"] == 5 and set(result) >= {"i2t", "t2i", "provenance"}
    assert set(result["i2t"]) == {"pmrp", "pmr1", "pmrp_thres"} and set(result["t2i"]["pmrp_thres"]) == {"0", "1", "2"}
    expected = pmrp_dict((case["sims"] + sims2) / 2, case["image_ids"], case["codes"], 5)
    assert_same(result, expected)
    assert result["provenance"]["sims"] == [str(case["dir"] / "sims.npy"), str(case["dir"] / "sims2.npy")]


def _expect_error(capsys, argv, out, name):
    assert errors.run(pmrp_evaluation.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0], err
    assert not os.path.exists(out)


def test_bad_inputs(pmrp_case, capsys, tmp_path):
    case = pmrp_case
    out = tmp_path / "never.json"
    base = ["--n_fold", "5", "--dataset_root", str(case["dir"]), "--json", str(out)]
    sims = str(case["dir"] / "sims.npy")
    # missing annotation file
    _expect_error(capsys, ["--path1", sims, "--ann_root", str(tmp_path / "nowhere")] + base, out,
                  "instances_val2014.json")
    # a file without annotations
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    (bad_root / "instances_val2014.json").write_text(json.dumps({"images": [], "info": {}}))
    _expect_error(capsys, ["--path1", sims, "--ann_root", str(bad_root)] + base, out, "annotations")
    # ids of the split absent from the annotation's images
    other_root = tmp_path / "other"
    other_root.mkdir()
    write_annotations(other_root / "instances_val2014.json", np.array([1, 2, 3]), np.random.default_rng(0))
    _expect_error(capsys, ["--path1", sims, "--ann_root", str(other_root)] + base, out, "instances_val2014.json")
    ann = ["--ann_root", str(case["ann_root"])]
    # wrong shape, transposed, NaN, not a .npy
    for name, array in (("wrong.npy", np.zeros((20, 99))), ("transposed.npy", case["sims"].T),
                        ("nan.npy", np.where(np.eye(20, 100) > 0, np.nan, case["sims"]))):
        np.save(tmp_path / name, array)
        _expect_error(capsys, ["--path1", str(tmp_path / name)] + ann + base, out, name)
    (tmp_path / "text.npy").write_text("not an array")
    _expect_error(capsys, ["--path1", str(tmp_path / "text.npy")] + ann + base, out, "text.npy")
    # testall_ids.txt with the wrong number of lines
    short = tmp_path / "short"
    short.mkdir()
    (short / "testall_ids.txt").write_text("1\n2\n")
    _expect_error(capsys, ["--path1", sims, "--dataset_root", str(short), "--n_fold", "0"] + ann, out,
                  "testall_ids.txt")


def test_transposed_message(pmrp_case, capsys, tmp_path):
    np.save(tmp_path / "t.npy", pmrp_case["sims"].T)
    argv = ["--path1", str(tmp_path / "t.npy"), "--n_fold", "0", "--dataset_root", str(pmrp_case["dir"]),
            "--ann_root", str(pmrp_case["ann_root"])]
    assert errors.run(pmrp_evaluation.main, argv) == 2
    assert "transposed" in capsys.readouterr().err


def test_streamed_pmrp_equals_pmrp_scores():
    """StreamedPMRP from uneven chunks of query rows (i2t image rows, t2i caption rows), some images without
    instances, tied scores: exactly pmrp_scores' numbers, whole split and each fold."""
    from layout import fold_bounds
    from pmrp_com.pmrp import StreamedPMRP, pmrp_scores

    rng = np.random.default_rng(21)
    n = 30
    codes = (rng.random((n, 90)) < 0.04).astype(np.uint8)
    codes[[3, 17]] = 0
    sims = rng.integers(0, 6, (n, 5 * n)).astype(np.float32)
    for lo, hi in [(0, n)] + fold_bounds(n):
        block = sims[lo:hi, 5 * lo:5 * hi]
        streamed = StreamedPMRP(codes[lo:hi])
        cuts = sorted({0, hi - lo, *rng.integers(1, hi - lo, 3).tolist()})
        for a, b in zip(cuts, cuts[1:]):
            streamed.add("i2t", a, block[a:b])
        for a in range(0, 5 * (hi - lo), 7):
            streamed.add("t2i", a, block[:, a:a + 7].T)
        expected = pmrp_scores(block, codes[lo:hi], n_fold=0)
        assert streamed.result() == {"i2t": expected["i2t"], "t2i": expected["t2i"]}
