"""Nothing a user types loses their work, and the command lines say what they do.

1. Refusals: make_synthetic_data.py over real data, vocab.py over another vocabulary, train.py over
   another run's checkpoints or TensorBoard logs; each is one `error:` line and leaves every byte (and
   the list of files) as it was.
2. Resume: `--resume CKPT --num_epochs N` alone continues with the checkpoint's options; dims and module
   cannot change; 'latest' and a folder find the newest checkpoint; TensorBoard steps never repeat.
3. Threads, early checks before scoring, near-miss data names, --help defaults, plot legends, and the
   README's commands.

Training runs are tiny (word 8, embed 16, sim 8, batch 16, one epoch, 10 validation images) on the
session's synthetic COCO.
"""
import argparse
import hashlib
import importlib
import logging
import os
import re
import shutil

import pytest
import torch

import checkpoint
import distributed
import errors
import evaluation
import layout
import make_synthetic_data
import np2h
from tools import plot_results
import train
import vocab as vocab_lib
from tests.conftest import ROOT

TINY = ["--word_dim", "8", "--embed_size", "16", "--sim_dim", "8", "--batch_size", "16", "--val_images", "10",
        "--log_step", "1", "--device", "cpu"]
# The run's own options, which a resume must bring back without their being repeated.
RUN_OPTIONS = {"learning_rate": 0.003, "daa_weight": 2.0, "warmup_epochs": 1, "lr_update": 5, "seed": 3}


def snapshot(*roots):
    """{path: sha256} of every file under `roots`: equal snapshots mean no byte and no file changed."""
    files = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


def refused(capsys, main, argv, *needles):
    """main(argv) exits 2 with one `error:` line holding every needle; returns the line."""
    assert errors.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def train_argv(synth, run_dir, *extra):
    return ["--data_path", synth.data_path, "--data_name", "coco_precomp", "--vocab_path", synth.vocab_path,
            "--model_name", str(run_dir), "--logger_name", str(run_dir / "log"), "--img_dim", str(synth.feat_dim),
            "--num_epochs", "1", *TINY, *[a for k, v in RUN_OPTIONS.items() for a in (f"--{k}", str(v))], *extra]


def scalars(log_dir, tag):
    """[(step, value)] of a TensorBoard scalar as TensorBoard shows it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def first_epoch(synth, tmp_path_factory):
    """A one-epoch SGR run on synthetic COCO: its folder holds checkpoint_0, model_best and log/."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    assert errors.run(train.main, train_argv(synth, run_dir)) == 0
    return run_dir


# ------------------------------------------------------------------------------------------------
# 1. Refusals leave every byte unchanged


@pytest.fixture
def real_layout(synth, tmp_path):
    """A repository root holding the real data as the original README lays it out (files the maker did
    not write: copied without its manifests) and a .h5 that np2h.py made."""
    for sub, target in (("data", "data"), ("vocab", "vocab"), ("coco_ann", os.path.join("pmrp_com", "coco_ann"))):
        shutil.copytree(os.path.join(synth.root, sub), tmp_path / target,
                        ignore=shutil.ignore_patterns(make_synthetic_data.MANIFEST))
    assert errors.run(np2h.main, ["--data_path", str(tmp_path / "data"), "--data_name", "coco_precomp",
                                  "--splits", "train"]) == 0
    return tmp_path


def test_synthetic_maker_refuses_the_real_data(real_layout, capsys, monkeypatch):
    """The README's former command, run from the repository root, changes nothing; nor does any one of
    its three folders alone."""
    monkeypatch.chdir(real_layout)
    before = snapshot(real_layout)
    ann = os.path.join("pmrp_com", "coco_ann")
    for (out_dir, vocab_dir, ann_dir), culprit in (
            (("data", "vocab", ann), os.path.join("data", "f30k_precomp", "train_caps.txt")),
            (("s/data", "vocab", "s/ann"), os.path.join("vocab", "f30k_precomp_vocab.json")),
            (("s/data", "s/vocab", ann), os.path.join(ann, "captions_val2014.json"))):
        argv = ["--out_dir", out_dir, "--vocab_dir", vocab_dir, "--ann_dir", ann_dir, "--tiny"]
        refused(capsys, make_synthetic_data.main, argv, f"{culprit}: exists and was not written by make_synthetic_data",
                "--out_dir synthetic/data")
    assert snapshot(real_layout) == before and sorted(os.listdir(real_layout)) == ["data", "pmrp_com", "vocab"]
    # an .h5 that is not beside a .npy of the maker's is someone else's too
    folder = real_layout / "data" / "coco_precomp"
    for name in os.listdir(folder):
        if name != "train.h5":
            os.remove(folder / name)
    before = snapshot(real_layout)
    argv = ["--out_dir", "data", "--vocab_dir", "s/vocab", "--ann_dir", "s/ann", "--tiny", "--datasets", "coco_precomp"]
    refused(capsys, make_synthetic_data.main, argv, os.path.join("data", "coco_precomp", "train.h5"))
    assert snapshot(real_layout) == before and sorted(os.listdir(real_layout)) == ["data", "pmrp_com", "vocab"]


def test_synthetic_maker_defaults_and_its_own_folders(tmp_path, capsys, monkeypatch):
    """Defaults stay out of data/, vocab/ and pmrp_com/; a re-run replaces its own files and drops the
    .h5 np2h.py made from them; a file changed since is refused."""
    parser = make_synthetic_data.build_parser()
    defaults = [parser.get_default(name) for name in ("out_dir", "vocab_dir", "ann_dir")]
    assert all(d.split(os.sep)[0] == "synthetic" for d in defaults), defaults
    argv = ["--tiny", "--datasets", "coco_precomp", "--out_dir", str(tmp_path / "d"), "--vocab_dir",
            str(tmp_path / "v"), "--ann_dir", str(tmp_path / "a")]
    assert errors.run(make_synthetic_data.main, argv) == 0
    first = snapshot(tmp_path)
    assert errors.run(np2h.main, ["--data_path", str(tmp_path / "d"), "--data_name", "coco_precomp"]) == 0
    assert errors.run(make_synthetic_data.main, argv) == 0
    second = snapshot(tmp_path)
    assert not [p for p in second if p.endswith(".h5")]
    manifests = [p for p in first if p.endswith(make_synthetic_data.MANIFEST)]
    assert len(manifests) == 3
    assert {p: h for p, h in second.items() if p not in manifests} == {p: h for p, h in first.items() if p not in manifests}
    vocab_file = tmp_path / "v" / "coco_precomp_vocab.json"
    vocab_file.write_text(vocab_file.read_text() + " ")
    before = snapshot(tmp_path)
    capsys.readouterr()
    refused(capsys, make_synthetic_data.main, argv, vocab_file, "changed since")
    assert snapshot(tmp_path) == before


def test_vocab_never_replaces_another_vocabulary(synth, tmp_path, capsys):
    vocab_dir = tmp_path / "vocab"
    shutil.copytree(synth.vocab_path, vocab_dir)
    released = vocab_dir / "coco_precomp_vocab.json"
    words = vocab_lib.deserialize_vocab(str(released)).word2idx
    vocab_lib.serialize_vocab(vocab_lib.vocab_from_word2idx({**words, "zebra": len(words)}), str(released))
    before = snapshot(vocab_dir)
    argv = ["--data_path", synth.data_path, "--data_name", "coco_precomp", "--vocab_path", str(vocab_dir)]
    refused(capsys, vocab_lib.main, argv, released, "--overwrite")
    assert snapshot(vocab_dir) == before
    # the same vocabulary again replaces nothing; --overwrite replaces a different one
    assert errors.run(vocab_lib.main, argv[:-1] + [synth.vocab_path]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert errors.run(vocab_lib.main, argv + ["--overwrite"]) == 0
    assert vocab_lib.deserialize_vocab(str(released)).word2idx == words


def test_a_new_run_refuses_another_runs_folders(first_epoch, synth, tmp_path, capsys):
    before = snapshot(first_epoch)
    # the same --model_name: the SAF run over the SGR run's checkpoints
    argv = train_argv(synth, first_epoch, "--module_name", "SAF")
    argv[argv.index("--logger_name") + 1] = str(tmp_path / "log")
    refused(capsys, train.main, argv, first_epoch, "checkpoint_0.pth.tar", "--resume")
    # the same --logger_name: two runs' curves in one folder
    argv = train_argv(synth, tmp_path / "new", "--module_name", "SAF")
    argv[argv.index("--logger_name") + 1] = str(first_epoch / "log")
    refused(capsys, train.main, argv, first_epoch / "log", "--logger_name")
    # --init_from starts a new run: the same rule
    argv = train_argv(synth, first_epoch, "--init_from", str(first_epoch / "checkpoint_0.pth.tar"))
    refused(capsys, train.main, argv, "--model_name")
    assert snapshot(first_epoch) == before and not (tmp_path / "new").exists() and not (tmp_path / "log").exists()


# ------------------------------------------------------------------------------------------------
# 2. Resume


def moved_run(run_dir, to):
    """A copy of a run's folder at `to`, its checkpoints' --model_name and --logger_name pointing there (as
    if it had been trained there), so that resuming it leaves the original untouched."""
    shutil.copytree(run_dir, to)
    for name in train.run_checkpoints(to):
        state = checkpoint.load_checkpoint(str(to / name))
        state["opt"].model_name, state["opt"].logger_name = str(to), str(to / "log")
        checkpoint.save_checkpoint(state, str(to / name))
    return to


def test_resume_with_only_num_epochs_continues_the_run(first_epoch, synth, tmp_path, caplog):
    """`--resume CKPT --num_epochs 2` alone: the checkpoint's options (learning rate, DAA weight, paths,
    dims) come back, the one change is logged, and it trains what the options typed in full train."""
    run_dir = moved_run(first_epoch, tmp_path / "run")
    ckpt = str(run_dir / "checkpoint_0.pth.tar")
    steps_per_epoch = checkpoint.load_checkpoint(ckpt)["Eiters"]
    caplog.set_level(logging.INFO, logger="train")
    assert errors.run(train.main, ["--resume", ckpt, "--num_epochs", "2"]) == 0
    assert "resuming with --num_epochs 2 instead of 1" in caplog.text
    resumed = checkpoint.load_checkpoint(str(run_dir / "checkpoint_1.pth.tar"))
    assert vars(resumed["opt"]) == dict(vars(checkpoint.load_checkpoint(ckpt)["opt"]), num_epochs=2, resume=ckpt)
    assert (resumed["epoch"], resumed["Eiters"]) == (2, 2 * steps_per_epoch)
    # the learning rate the second epoch used, as logged: the run's (not the default 0.00015)
    second = [value for step, value in scalars(run_dir / "log", "lr") if step > steps_per_epoch]
    assert second == [pytest.approx(RUN_OPTIONS["learning_rate"])] * steps_per_epoch
    # the same epoch from the same checkpoint with every option typed: the same weights
    typed = moved_run(first_epoch, tmp_path / "typed")
    assert errors.run(train.main, train_argv(synth, typed, "--resume", str(typed), "--num_epochs", "2")) == 0
    again = checkpoint.load_checkpoint(str(typed / "checkpoint_1.pth.tar"))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again["model"], resumed["model"]) for k in a)


def test_tensorboard_steps_never_repeat(first_epoch, tmp_path):
    """Epoch 1 trained twice from checkpoint_0 (a run resumed from an earlier checkpoint): TensorBoard shows
    every step once, the second session's values."""
    run_dir = tmp_path / "run"
    shutil.copytree(first_epoch, run_dir)
    ckpt = str(run_dir / "checkpoint_0.pth.tar")
    argv = ["--resume", ckpt, "--num_epochs", "2", "--logger_name", str(tmp_path / "log")]
    shutil.copytree(first_epoch / "log", tmp_path / "log")
    assert errors.run(train.main, argv) == 0
    steps_per_epoch = checkpoint.load_checkpoint(ckpt)["Eiters"]
    first = scalars(tmp_path / "log", "loss")
    assert errors.run(train.main, argv) == 0
    shown = scalars(tmp_path / "log", "loss")
    assert [step for step, _ in shown] == list(range(1, 2 * steps_per_epoch + 1))
    assert shown == first  # the resume is exact, so the second session logged the same values
    assert [step for step, _ in scalars(tmp_path / "log", "r_sum")] == [steps_per_epoch, 2 * steps_per_epoch]


def test_resume_latest_a_folder_and_what_cannot_change(first_epoch, synth, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(first_epoch, run_dir)
    before = snapshot(run_dir)
    ckpt = str(run_dir / "checkpoint_0.pth.tar")
    refused(capsys, train.main, ["--resume", ckpt, "--embed_size", "32"], ckpt, "embed_size=16", "cannot change")
    refused(capsys, train.main, ["--resume", ckpt, "--module_name", "SAF"], ckpt, "module_name=SGR")
    refused(capsys, train.main, ["--resume", ckpt, "--init_from", ckpt], "--init_from")
    refused(capsys, train.main, ["--resume", str(tmp_path)], tmp_path, "no checkpoint_")
    # resuming into another run's folder
    other = tmp_path / "other"
    shutil.copytree(first_epoch, other)
    refused(capsys, train.main, ["--resume", ckpt, "--model_name", str(other), "--num_epochs", "2"], other)
    # 'latest' and a folder find checkpoint_0; the run has finished its one epoch: nothing to do
    caplog.set_level(logging.INFO, logger="train")
    for argv in (["--resume", "latest", "--model_name", str(run_dir)], ["--resume", str(run_dir)]):
        assert errors.run(train.main, argv) == 0
        assert f"{ckpt}: the run is complete (finished epochs: 1, --num_epochs 1), nothing to train" in caplog.text
        caplog.clear()
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------------------------
# 3. Threads


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_threads_option(first_epoch, synth, tmp_path, monkeypatch, two_threads):
    """--threads 1 is what the training and the scoring run with; the caller's threads come back after."""
    seen = []
    forward = train.DAALoss.forward
    monkeypatch.setattr(train.DAALoss, "forward", lambda self, *a, **k: seen.append(torch.get_num_threads())
                        or forward(self, *a, **k))
    assert errors.run(train.main, train_argv(synth, tmp_path / "run", "--threads", "1")) == 0
    score_matrix = evaluation.score_matrix
    monkeypatch.setattr(evaluation, "score_matrix", lambda *a: seen.append(-torch.get_num_threads())
                        or score_matrix(*a))
    assert errors.run(evaluation.main, ["--model_path", str(first_epoch / "model_best.pth.tar"), "--split", "test",
                                        "--threads", "1"]) == 0
    assert seen and set(seen) == {1, -1}
    assert torch.get_num_threads() == 2


def test_set_threads_per_process(monkeypatch, two_threads):
    """K CPU processes share the cores unless --threads says how many each takes."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for threads, processes, expected in ((0, 1, 2), (0, 2, 4), (0, 16, 1), (3, 2, 3), (1, 1, 1)):
        torch.set_num_threads(2)
        distributed.set_threads(threads, processes)
        assert torch.get_num_threads() == expected, (threads, processes)


def test_cpu_processes_share_only_their_own_machine(monkeypatch):
    """Under torchrun the processes of this machine (LOCAL_WORLD_SIZE) share its cores: two machines of
    one process each are not two processes on one machine. --world_size K: all K are here."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.processes_on_this_machine(2) == 1
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert distributed.processes_on_this_machine(2) == 2


# ------------------------------------------------------------------------------------------------
# 4. Early checks, names, help, legends


def forbid_scoring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a matrix was scored before the check")
    monkeypatch.setattr(evaluation, "compute_sims", fail)


def test_evaluation_checks_before_scoring(first_epoch, tmp_path, capsys, monkeypatch):
    ckpt = str(first_epoch / "model_best.pth.tar")
    forbid_scoring(monkeypatch)
    refused(capsys, evaluation.main, ["--model_path", ckpt, "--split", "testall", "--eccv"], "25000 captions",
            "coco_precomp testall has 250")
    refused(capsys, evaluation.main, ["--model_path", ckpt, "--model_path2", ckpt], "an SGR model like", "--sims")
    state = checkpoint.load_checkpoint(ckpt)
    state["opt"] = argparse.Namespace(**dict(vars(state["opt"]), module_name="SAF", data_name="f30k_precomp"))
    checkpoint.save_checkpoint(state, str(tmp_path / "saf_f30k.pth.tar"))
    refused(capsys, evaluation.main, ["--model_path", ckpt, "--model_path2", str(tmp_path / "saf_f30k.pth.tar")],
            "trained on f30k_precomp", "coco_precomp")


def test_near_miss_data_names(synth, tmp_path, capsys):
    coco = os.path.join(synth.data_path, "coco_precomp")
    with pytest.raises(errors.InputError, match="did you mean --data_name coco_precomp"):
        layout.dataset_dir(synth.data_path, "coco")
    with pytest.raises(errors.InputError, match=re.escape(f"give --data_path {synth.data_path} --data_name coco_precomp")):
        layout.dataset_dir(coco, "coco_precomp")
    with pytest.raises(errors.InputError, match="folders in .*coco_precomp, f30k_precomp"):
        layout.dataset_dir(synth.data_path, "xyz")
    assert layout.dataset_dir(synth.data_path, "coco_precomp") == coco
    # train.py names the data before it looks for a vocabulary; evaluation.py and vocab.py say the same
    argv = train_argv(synth, tmp_path / "run")
    argv[argv.index("--data_name") + 1] = "coco"
    refused(capsys, train.main, argv, "did you mean --data_name coco_precomp")
    refused(capsys, evaluation.main, ["--sims", str(tmp_path / "s.npy"), "--data_path", coco, "--data_name",
                                      "coco_precomp"], "--data_path already ends in coco_precomp")
    refused(capsys, vocab_lib.main, ["--data_path", synth.data_path, "--data_name", "coco", "--vocab_path",
                                     str(tmp_path)], "did you mean")


def test_evaluation_header_names_the_dataset(first_epoch, capsys):
    assert errors.run(evaluation.main, ["--model_path", str(first_epoch / "model_best.pth.tar"), "--split", "test",
                                        "--device", "cpu"]) == 0
    assert "coco_precomp test: 40 images" in capsys.readouterr().out


SCRIPTS = ["train", "np2h", "vocab", "evaluation", "pmrp_evaluation", "make_synthetic_data", "run_demo",
           "tools.plot_results", "tools.ablation", "tools.bench"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_option_a_line_and_its_default(script, monkeypatch):
    class Shown(Exception):
        pass

    def print_help(parser, file=None):
        raise Shown(parser)

    monkeypatch.setattr(errors.ArgumentParser, "print_help", print_help)
    with pytest.raises(Shown) as shown:
        importlib.import_module(script).main(["--help"])
    parser = shown.value.args[0]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        assert action.help and action.help.strip(), (script, action.option_strings)
        if action.nargs != 0 and action.default not in (None, "", []):
            assert f"(default: {action.default})" in text, (script, action.option_strings)


def test_plot_legends_name_the_runs(first_epoch, tmp_path, monkeypatch):
    for run in ("coco_SGR", "coco_SAF"):
        shutil.copytree(first_epoch / "log", tmp_path / "runs" / run / "log")
    figures = []
    monkeypatch.setattr(plot_results, "save", lambda fig, path: figures.append(fig))
    logs = [str(tmp_path / "runs" / run / "log") for run in ("coco_SGR", "coco_SAF")]
    assert errors.run(plot_results.main, ["--logs", *logs, "--out_dir", str(tmp_path)]) == 0
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["coco_SGR", "coco_SAF"]
    assert plot_results.run_names(["demo_output/logs/SGR", "demo_output/logs/SAF"]) == ["SGR", "SAF"]


# ------------------------------------------------------------------------------------------------
# 5. The README's commands


def readme_commands():
    """Every `python ...` command of the README's code blocks, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].split() for line in text.splitlines() if line.strip().startswith("python ")]


def test_readme_commands_are_safe_and_complete():
    commands = readme_commands()
    recipes = [c for c in commands if c[1] == "train.py"]
    assert len(recipes) >= 4
    for flag in ("--model_name", "--logger_name"):
        names = [c[c.index(flag) + 1] for c in recipes]
        assert len(set(names)) == len(names), (flag, names)
    for command in commands:
        if command[1] == "make_synthetic_data.py":
            for flag, real in (("--out_dir", "data"), ("--vocab_dir", "vocab"), ("--ann_dir", "pmrp_com/coco_ann")):
                assert flag in command and os.path.normpath(command[command.index(flag) + 1]) != real
    # every matrix a command reads was saved by a command before it
    saved = set()
    for command in commands:
        for i, word in enumerate(command[:-1]):
            if word in ("--sims", "--path1", "--path2") and command[1] in ("evaluation.py", "pmrp_evaluation.py"):
                assert command[i + 1] in saved, (command[i + 1], " ".join(command))
        if "--save_sims" in command:
            saved.add(command[command.index("--save_sims") + 1])
