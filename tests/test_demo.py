"""run_demo.py end to end (quick sizes), its table against a recomputation from the saved matrices; the plots."""
import json
import os

import numpy as np
import pytest

import errors
import evaluation
import plot_results
import run_demo
from pmrp_com.pmrp import instance_codes, pmrp_scores, read_image_ids

KEYS = ("r1", "r5", "r10", "pmrp", "asp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, run once in this process (no interpreter start-up per step)."""
    out_dir = str(tmp_path_factory.mktemp("demo"))
    assert errors.run(run_demo.main, ["--quick", "--in_process", "--out_dir", out_dir]) == 0
    run_demo.IN_PROCESS = False
    return out_dir


@pytest.mark.slow
def test_table_has_every_row_with_numbers_in_range(demo):
    with open(os.path.join(demo, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert [(r["scope"], r["model"]) for r in results["rows"]] == [
        (scope, model) for scope in ("1K", "5K") for model in ("SAF", "SGR", "SGRAF")]
    for row in results["rows"]:
        for d in ("i2t", "t2i"):
            values = row[d]
            assert all(0.0 <= values[k] <= 100.0 for k in KEYS), row
            assert values["r1"] <= values["r5"] <= values["r10"]
    with open(os.path.join(demo, "results.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = [line for line in lines if line.startswith("| COCO")]
    assert len(rows) == 6 and all(line.count("|") == 13 for line in rows)
    with open(os.path.join(demo, "training_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_table_equals_a_recomputation_from_the_saved_matrices(demo):
    with open(os.path.join(demo, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    data_path = os.path.join(demo, "data")
    coco_root = os.path.join(data_path, run_demo.DATA_NAME)
    relevance, _ = evaluation.relevance_of_split(data_path, run_demo.DATA_NAME, "testall")
    sems = relevance.matrix()
    sims = {m: np.load(os.path.join(demo, results["files"][m]["sims"])) for m in run_demo.MODELS}
    # SGRAF is the mean of the SGR and SAF matrices (computed by evaluation.py from the two checkpoints).
    np.testing.assert_allclose(sims["SGRAF"], (sims["SGR"] + sims["SAF"]) / 2, atol=1e-6)
    codes = instance_codes(os.path.join(demo, "coco_ann", "instances_val2014.json"),
                           read_image_ids(os.path.join(coco_root, "testall_ids.txt"), sems.shape[0]))
    for row in results["rows"]:
        matrix = sims[row["model"]]
        if row["scope"] == "1K":
            scores, pmrp = evaluation.score_folds(matrix, sems), pmrp_scores(matrix, codes, n_fold=5)
        else:
            scores, pmrp = evaluation.score_matrix(matrix, sems), pmrp_scores(matrix, codes, n_fold=0)
        for d in ("i2t", "t2i"):
            expected = {k: scores[d][k] for k in ("r1", "r5", "r10", "asp")}
            expected["pmrp"] = pmrp[d]["pmrp"]
            assert row[d] == pytest.approx(expected, abs=1e-9), (row["scope"], row["model"], d)


def test_a_failing_step_stops_the_demo_with_one_line(tmp_path):
    with pytest.raises(errors.InputError, match=r"np2h\.py exited with code 2 .*the command was: python .*np2h\.py"):
        run_demo.run_script("np2h.py", ["--data_path", str(tmp_path / "missing"), "--data_name", "x"], "np2h")


def test_ablation_chart_and_bad_input(tmp_path, capsys):
    directions = {d: {"r1": 20.0, "r5": 50.0, "r10": 70.0, "asp": 55.0, "pmrp": 30.0} for d in ("i2t", "t2i")}
    spread = {d: {k: 1.0 for k in directions[d]} for d in directions}
    report = {"scope": "test", "seeds": [0, 1, 2],
              "variants": [{"name": name, "mean": directions, "std": spread} for name in ("off", "paper", "reference")]}
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    assert errors.run(plot_results.main, ["--ablation", str(path), "--out_dir", str(tmp_path)]) == 0
    assert (tmp_path / "ablation_daa.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert errors.run(plot_results.main, ["--logs", str(tmp_path / "nope"), "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not found" in err[0]


def test_demo_never_removes_folders_it_did_not_write(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_demo, "IN_PROCESS", False)  # main() sets it; restored after the test
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("real data", encoding="utf-8")
    assert errors.run(run_demo.main, ["--quick", "--in_process", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by run_demo.py" in err[0]
    assert (tmp_path / "data" / "keep.txt").read_text(encoding="utf-8") == "real data"


@pytest.mark.slow
def test_ablation_runs_each_setting_and_summarises_what_it_measured(tmp_path, capsys):
    """ablation.py --quick over two seeds: the right options per run, every number recomputed from the
    run's saved matrix, mean/std/paired differences recomputed from the runs; a re-run trains nothing."""
    import ablation
    import checkpoint

    out_dir = tmp_path / "ablation"
    argv = ["--quick", "--in_process", "--seeds", "0", "1", "--out_dir", str(out_dir)]
    assert errors.run(ablation.main, argv) == 0
    run_demo.IN_PROCESS = False
    report = json.loads((out_dir / "ablation.json").read_text(encoding="utf-8"))
    assert [v["key"] for v in report["variants"]] == ["off", "paper", "reference"]

    data_path = str(out_dir / "data")
    coco_root = os.path.join(data_path, run_demo.DATA_NAME)
    relevance, _ = evaluation.relevance_of_split(data_path, run_demo.DATA_NAME, "testall")
    sems = relevance.matrix()
    codes = instance_codes(str(out_dir / "coco_ann" / "instances_val2014.json"),
                           read_image_ids(os.path.join(coco_root, "testall_ids.txt"), sems.shape[0]))
    expected_options = {"off": (0.0, "paper"), "paper": (1.0, "paper"), "reference": (1.0, "reference")}
    for variant in report["variants"]:
        for run in variant["runs"]:
            name = f"{variant['key']}_seed{run['seed']}"
            opt = checkpoint.load_checkpoint(str(out_dir / "runs" / name / "model_best.pth.tar"))["opt"]
            assert (opt.daa_weight, opt.daa_variant, opt.seed) == expected_options[variant["key"]] + (run["seed"],)
            sims = np.load(out_dir / "eval" / f"{name}.npy")
            scores, pmrp = evaluation.score_matrix(sims, sems), pmrp_scores(sims, codes, n_fold=0)
            for d in ("i2t", "t2i"):
                expected = {k: scores[d][k] for k in ("r1", "r5", "r10", "asp")}
                expected["pmrp"] = pmrp[d]["pmrp"]
                assert run[d] == pytest.approx(expected, abs=1e-9), (name, d)
        for d in ("i2t", "t2i"):
            for k in KEYS:
                values = np.array([run[d][k] for run in variant["runs"]])
                assert variant["mean"][d][k] == pytest.approx(values.mean(), abs=1e-9)
                assert variant["std"][d][k] == pytest.approx(values.std(ddof=1), abs=1e-9)
                if variant["key"] != "off":
                    off = np.array([run[d][k] for run in report["variants"][0]["runs"]])
                    assert variant["paired_difference"]["mean"][d][k] == pytest.approx((values - off).mean(), abs=1e-9)
    table = (out_dir / "ablation.md").read_text(encoding="utf-8").splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| DAA off", "| DAA paper", "| DAA reference", "| DAA paper − DAA off", "| DAA reference − DAA off"]

    # Finished runs are not redone: a second call only re-reads them and writes the same report.
    checkpoint_file = out_dir / "runs" / "off_seed0" / "model_best.pth.tar"
    stamp = checkpoint_file.stat().st_mtime_ns
    assert errors.run(ablation.main, argv) == 0
    run_demo.IN_PROCESS = False
    assert checkpoint_file.stat().st_mtime_ns == stamp
    assert json.loads((out_dir / "ablation.json").read_text(encoding="utf-8")) == report
    # Other settings in the same folder are refused rather than mixed in.
    capsys.readouterr()
    assert errors.run(ablation.main, argv + ["--daa_weight", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
