"""run_demo.py end to end (quick sizes), its table against a recomputation from the saved matrices; the plots."""
import json
import os

import numpy as np
import pytest

import errors
import evaluation
from tools import plot_results
import run_demo
from pmrp_com.pmrp import instance_codes, pmrp_scores, read_image_ids

KEYS = ("r1", "r5", "r10", "pmrp", "asp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, run once in this process (no interpreter start-up per step)."""
    out_dir = str(tmp_path_factory.mktemp("demo"))
    assert errors.run(run_demo.main, ["--quick", "--in_process", "--out_dir", out_dir]) == 0
    return out_dir


@pytest.mark.slow
def test_table_has_every_row_with_numbers_in_range(demo):
    with open(os.path.join(demo, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert [(r["scope"], r["model"]) for r in results["rows"]] == [
        (scope, model) for scope in ("1K", "5K") for model in
        ("SAF", "SGR", "SGRAF", "VSE", "random scores", "constant scores", "content oracle", "relevance M")]
    for row in results["rows"]:
        for d in ("i2t", "t2i"):
            values = row[d]
            assert all(0.0 <= values[k] <= 100.0 for k in KEYS), row
            assert values["r1"] <= values["r5"] <= values["r10"]
    with open(os.path.join(demo, "results.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = [line for line in lines if line.startswith("| COCO")]
    assert len(rows) == 16 and all(line.count("|") == 13 for line in rows)
    by_row = {(r["scope"], r["model"]): r for r in results["rows"]}
    n_images = results["sizes"]["n_testall"]
    for scope, images in (("1K", n_images // 5), ("5K", n_images)):
        for d, gallery in (("i2t", 5 * images), ("t2i", images)):
            # constant scores rank every item last (n); average relevance rank (n + 1) / 2: ASP (n + 1) / 2n,
            # about 50 on real sizes; the relevance itself scores 100 (less the few ties within M)
            assert by_row[(scope, "constant scores")][d]["asp"] == pytest.approx(50 * (gallery + 1) / gallery, abs=1)
            assert by_row[(scope, "relevance M")][d]["asp"] > 99
            assert by_row[(scope, "content oracle")][d]["asp"] > by_row[(scope, "random scores")][d]["asp"]
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
    sims = {m: np.load(os.path.join(demo, results["files"][m]["sims"])) for m in run_demo.MODELS + run_demo.REFERENCES}
    np.testing.assert_array_equal(sims["relevance M"], sems)
    # SGRAF is the mean of the SGR and SAF matrices (computed by evaluation.py from the two checkpoints).
    np.testing.assert_allclose(sims["SGRAF"], (sims["SGR"] + sims["SAF"]) / 2, atol=1e-6)
    codes = instance_codes(os.path.join(demo, "coco_ann", "instances_val2014.json"),
                           read_image_ids(os.path.join(coco_root, "testall_ids.txt"), sems.shape[0]))
    for row in results["rows"]:
        matrix = sims[row["model"]]
        if row["scope"] == "1K":
            scores, pmrp = evaluation.score_folds(evaluation.fold_blocks(matrix), evaluation.fold_blocks(sems)), pmrp_scores(matrix, codes, n_fold=5)
        else:
            scores, pmrp = evaluation.score_matrix(matrix, sems), pmrp_scores(matrix, codes, n_fold=0)
        for d in ("i2t", "t2i"):
            expected = {k: scores[d][k] for k in ("r1", "r5", "r10", "asp")}
            expected["pmrp"] = pmrp[d]["pmrp"]
            assert row[d] == pytest.approx(expected, abs=1e-9), (row["scope"], row["model"], d)


def test_a_failing_step_stops_the_demo_with_one_line(tmp_path):
    with pytest.raises(errors.InputError, match=r"np2h\.py exited with code 2 .*the command was: python .*np2h\.py"):
        run_demo.Runner()("np2h.py", ["--data_path", str(tmp_path / "missing"), "--data_name", "x"], "np2h")


def test_ablation_chart_and_bad_input(tmp_path, capsys):
    directions = {d: {"r1": 20.0, "r5": 50.0, "r10": 70.0, "asp": 55.0, "pmrp": 30.0} for d in ("i2t", "t2i")}
    spread = {d: {k: 1.0 for k in directions[d]} for d in directions}
    groups = [{"module": "SAF", "daa_weight": w, "variant": v, "mean": directions, "std": spread, "runs": [{}, {}]}
              for w, v in ((0, None), (25, "reference"), (25, "paper"))]
    report = {"scope": "test", "groups": groups, "references": {"content oracle": directions}}
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    assert errors.run(plot_results.main, ["--ablation", str(path), "--out_dir", str(tmp_path)]) == 0
    assert (tmp_path / "ablation_daa.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert errors.run(plot_results.main, ["--logs", str(tmp_path / "nope"), "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not found" in err[0]


def test_demo_never_removes_folders_it_did_not_write(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("real data", encoding="utf-8")
    assert errors.run(run_demo.main, ["--quick", "--in_process", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by run_demo.py" in err[0]
    assert (tmp_path / "data" / "keep.txt").read_text(encoding="utf-8") == "real data"


@pytest.mark.slow
def test_ablation_runs_each_setting_and_summarises_what_it_measured(tmp_path, capsys):
    """ablation.py --quick: the right options per run, every number recomputed from the run's saved matrix,
    mean/std/paired differences and their 95 % intervals recomputed from the runs; a re-run trains nothing."""
    import scipy.stats

    from tools import ablation
    import checkpoint

    out_dir = tmp_path / "ablation"
    argv = ["--quick", "--in_process", "--out_dir", str(out_dir)]
    assert errors.run(ablation.main, argv) == 0
    report = json.loads((out_dir / "ablation.json").read_text(encoding="utf-8"))
    assert [g["key"] for g in report["groups"]] == ["SAF_w0", "SAF_w25_reference", "SAF_w25_paper", "VSE_w0",
                                                    "VSE_w25_reference", "PCME_w0", "PCME_w25_reference",
                                                    "SAF_w25_tie_aware", "SAF_w0_noise0.2", "SAF_w25_tie_aware_noise0.2"]

    data_path = str(out_dir / "data")
    coco_root = os.path.join(data_path, run_demo.DATA_NAME)
    relevance, _ = evaluation.relevance_of_split(data_path, run_demo.DATA_NAME, "testall")
    sems = relevance.matrix()
    codes = instance_codes(str(out_dir / "coco_ann" / "instances_val2014.json"),
                           read_image_ids(os.path.join(coco_root, "testall_ids.txt"), sems.shape[0]))

    def recomputed(sims):
        scores, pmrp = evaluation.score_matrix(sims, sems), pmrp_scores(sims, codes, n_fold=0)
        return {d: dict({k: scores[d][k] for k in ("r1", "r5", "r10", "asp")}, pmrp=pmrp[d]["pmrp"])
                for d in ("i2t", "t2i")}

    for name, scores in report["references"].items():
        expected = recomputed(np.load(out_dir / "eval" / (name.replace(" ", "_") + ".npy")))
        for d in ("i2t", "t2i"):
            assert scores[d] == pytest.approx(expected[d], abs=1e-9), (name, d)
    off_of = {(g["module"], g["noise_rate"]): g for g in report["groups"] if not g["daa_weight"]}  # DAA off, per model and data
    for group in report["groups"]:
        off = off_of[group["module"], group["noise_rate"]]
        for run in group["runs"]:
            name = f"{group['key']}_seed{run['seed']}"
            opt = checkpoint.load_checkpoint(str(out_dir / "runs" / name / "model_best.pth.tar"))["opt"]
            assert (opt.module_name, opt.daa_weight, opt.seed) == (group["module"], group["daa_weight"], run["seed"])
            # noisy runs train on the noisy copy (its own folder), and are scored on the one clean testall
            noisy_data = str(out_dir / f"noise{group['noise_rate']:g}" / "data")
            assert opt.data_path == (noisy_data if group["noise_rate"] else data_path)
            if group["daa_weight"]:
                assert opt.daa_variant == group["variant"]
            expected = recomputed(np.load(out_dir / "eval" / f"{name}.npy"))
            for d in ("i2t", "t2i"):
                assert run[d] == pytest.approx(expected[d], abs=1e-9), (name, d)
        for d in ("i2t", "t2i"):
            for k in KEYS:
                values = np.array([run[d][k] for run in group["runs"]])
                assert group["mean"][d][k] == pytest.approx(values.mean(), abs=1e-9)
                assert group["std"][d][k] == pytest.approx(values.std(ddof=1) if len(values) > 1 else 0, abs=1e-9)
                if group is not off:
                    diff = values - np.array([run[d][k] for run in off["runs"]])
                    paired = group["paired_difference"]
                    assert paired["mean"][d][k] == pytest.approx(diff.mean(), abs=1e-9)
                    if len(diff) == 1:  # one seed: no interval
                        assert paired["ci95_low"] is None and paired["ci95_high"] is None
                        continue
                    half = scipy.stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
                    assert paired["ci95_low"][d][k] == pytest.approx(diff.mean() - half, abs=1e-9)
                    assert paired["ci95_high"][d][k] == pytest.approx(diff.mean() + half, abs=1e-9)
            oracle = report["references"]["content oracle"][d]["asp"]
            assert group["asp_headroom_covered"][d] == pytest.approx(
                100 * (group["mean"][d]["asp"] - off["mean"][d]["asp"]) / (oracle - off["mean"][d]["asp"]))
    # The plateau runs were trained without warm-up at the stated settings, one per weight and seed; their
    # measures recomputed from the TensorBoard logs: the last epoch's full batches (13 iterations of 16, 16,
    # ..., 8 captions per epoch) against 2 B m, the last dev rsum, and the difference from weight 0.
    plateau = report["plateau"]
    assert plateau["iterations_per_epoch"] == 13
    measured = {}
    for entry in plateau["weights"]:
        for run in entry["runs"]:
            name = f"plateau_SAF_w{entry['daa_weight']:g}_seed{run['seed']}"
            opt = checkpoint.load_checkpoint(str(out_dir / "runs" / name / "model_best.pth.tar"))["opt"]
            assert (opt.warmup_epochs, opt.daa_weight, opt.learning_rate) == (0, entry["daa_weight"], 0.0006)
            scalars = plot_results.read_scalars(str(out_dir / "logs" / name))
            steps, hinge = scalars["contrastive_loss"]
            last_epoch = [v for k, v in zip(steps, hinge) if 13 < k < 26]  # iterations 14..25 of 26
            assert len(last_epoch) == 12
            assert run["hinge_above_2Bm"] == pytest.approx(np.mean(last_epoch) - 2 * 16 * 0.2, abs=1e-9)
            assert run["dev_rsum"] == pytest.approx(scalars["r_sum"][1][-1], abs=1e-9)
            measured[entry["daa_weight"]] = run
        assert entry["hinge_above_2Bm"]["mean"] == pytest.approx(np.mean([r["hinge_above_2Bm"] for r in entry["runs"]]))
    difference = plateau["weights"][1]["paired_difference"]["dev_rsum"]
    assert difference["n"] == 1 and difference["ci95_low"] is None
    assert difference["mean"] == pytest.approx(measured[25]["dev_rsum"] - measured[0]["dev_rsum"], abs=1e-9)
    tie = report["tie_reward"]
    assert tie["asp_soft"]["constant"] > tie["asp_soft"]["random"] + 0.05 and tie["asp_soft"]["relevance"] == 1.0
    assert tie["asp"]["constant"] == pytest.approx(0.5, abs=0.02)
    assert tie["asp_soft_tie_aware"]["constant"] <= tie["asp_soft_tie_aware"]["random"]
    for group in report["groups"]:  # the dev rsum settings are chosen on: each run's model_best's
        for run in group["runs"]:
            best = checkpoint.load_checkpoint(str(out_dir / "runs" / f"{group['key']}_seed{run['seed']}" / "model_best.pth.tar"))
            assert run["dev_rsum"] == best["best_rsum"]
        assert group["dev_rsum"]["mean"] == pytest.approx(np.mean([r["dev_rsum"] for r in group["runs"]]))
    table = (out_dir / "ablation.md").read_text(encoding="utf-8")
    assert "| content oracle |" in table and "| SAF, DAA 25 reference − off (n=2) |" in table
    assert "| PCME, DAA 25 reference − off (n=1) |" in table

    # Finished runs are not redone: a second call only re-reads them and writes the same report.
    checkpoint_file = out_dir / "runs" / "SAF_w0_seed0" / "model_best.pth.tar"
    stamp = checkpoint_file.stat().st_mtime_ns
    assert errors.run(ablation.main, argv) == 0
    assert checkpoint_file.stat().st_mtime_ns == stamp
    assert json.loads((out_dir / "ablation.json").read_text(encoding="utf-8")) == report
    # Other settings in the same folder are refused rather than mixed in.
    capsys.readouterr()
    assert errors.run(ablation.main, ["--out_dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


def test_ablation_refuses_a_thread_count_below_one_before_writing(tmp_path, capsys):
    from tools import ablation

    assert errors.run(ablation.main, ["--threads", "0", "--out_dir", str(tmp_path / "ablation")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --threads must be at least 1 (got 0)"] and not (tmp_path / "ablation").exists()


def test_plateau_length_is_where_the_hinge_loss_leaves_the_collapse():
    from tools import ablation

    collapsed = 2 * 32 * 0.2
    steps = np.arange(5, 5 * 31, 5)
    values = np.full(30, collapsed)
    values[3] = 0.5 * collapsed  # a single dip is not the end of the collapse
    values[20:] = 0.6 * collapsed
    assert ablation.plateau_length(steps, values, 32, 0.2) == steps[20]
    values[20:] = 0.95 * collapsed  # above 90 % of 2 B m: still collapsed
    assert ablation.plateau_length(steps, values, 32, 0.2) is None


def test_plateau_measures_leave_out_each_epochs_smaller_last_batch():
    """An epoch of 10 iterations whose last batch holds 8 captions of 32: its low hinge loss neither ends the
    collapse nor lowers the last epoch's mean; rsum is the last validation's."""
    from tools import ablation

    collapsed = 2 * 32 * 0.2
    steps = np.arange(1, 31)
    hinge = np.where(steps % 10 == 0, 2 * 8 * 0.2, collapsed + 0.01 * (steps > 20))
    curve = {"steps": steps.tolist(), "contrastive_loss": hinge.tolist(), "validation_steps": [10, 20, 30],
             "r_sum": [40.0, 55.0, 61.5]}
    measures = ablation.plateau_measures(curve, 32, 10)
    assert measures["plateau_iterations"] is None
    assert measures["hinge_above_2Bm"] == pytest.approx(0.01)
    assert measures["dev_rsum"] == 61.5


def test_ablation_goes_on_in_a_folder_made_with_a_shorter_grid():
    """Grid entries appended (as VSE and PCME were) keep a folder's finished runs; any other change is refused."""
    from tools import ablation

    settings = {"size": "full", "training": {"batch_size": 32}, "grid": [["SAF", [0, 25], ["reference"], [0, 1]],
                                                                          ["VSE", [0, 25], ["reference"], [0]]]}
    assert ablation.extends(settings, settings)
    assert ablation.extends(settings, dict(settings, grid=settings["grid"][:1]))
    assert not ablation.extends(settings, dict(settings, grid=settings["grid"][1:]))
    assert not ablation.extends(settings, dict(settings, grid=[["SAF", [0, 25], ["reference"], [0]]]))
    assert not ablation.extends(settings, dict(settings, training={"batch_size": 16}))


def test_ablation_grid_models_with_options_and_data_drawn_with_another_binding(tmp_path):
    """A GRID model of MODEL_OPTIONS trains its module with its options; a binding other than the maker's
    default trains and is scored on its own data set (data, vocabulary, testall); noisy data trains on its
    captions and is scored on the clean testall with the clean vocabulary; names say all of it."""
    from tools import ablation

    entries = [("VSEgpo", (0, 25), ("tie_aware",), range(1)), ("SAF", (0,), ("reference",), range(2), 0, 0.0),
               ("SAF", (0,), ("reference",), range(1), 0.2)]
    runs = ablation.grid_runs(entries)
    assert [(r[0], r[4]) for r in runs] == [("VSEgpo_w0", 0), ("VSEgpo_w25_tie_aware", 0), ("SAF_w0_binding0", 0),
                                            ("SAF_w0_binding0", 1), ("SAF_w0_noise0.2", 0)]
    assert ablation.module_args("VSEgpo") == ("VSE", ["--vse_pool", "gpo"]) and ablation.module_args("SAF") == ("SAF", [])
    out = str(tmp_path)
    assert ablation.data_of(out, 0, 0.0) == {key: os.path.join(out, "binding0", folder) for key, folder in
                                             (("train", "data"), ("evaluate", "data"), ("vocab", "vocab"), ("ann", "coco_ann"))}
    assert ablation.data_of(out, 0.2, ablation.DEFAULT_BINDING) == {
        "train": os.path.join(out, "noise0.2", "data"), "evaluate": os.path.join(out, "data"),
        "vocab": os.path.join(out, "vocab"), "ann": os.path.join(out, "coco_ann")}
    with pytest.raises(ValueError):
        ablation.grid_runs([("SAF", (0,), ("reference",), range(1), 0.2, 0.0)])

    commands = []

    def record(script, args, title):
        commands.append((script, [str(a) for a in args]))

    spec = runs[1]
    ablation.train(record, out, "quick", spec, dict(run_demo.TRAINING["quick"], daa_weight=25), "t")
    script, args = commands[0]
    assert script == "train.py" and args[args.index("--module_name") + 1] == "VSE"
    assert args[-4:] == ["--daa_variant", "tie_aware", "--vse_pool", "gpo"]
    assert args[args.index("--data_path") + 1] == os.path.join(out, "data")
    ablation.train(record, out, "quick", runs[2], dict(run_demo.TRAINING["quick"], daa_weight=0), "t")
    args = commands[1][1]
    assert args[args.index("--data_path") + 1] == os.path.join(out, "binding0", "data")
    assert args[args.index("--vocab_path") + 1] == os.path.join(out, "binding0", "vocab")
