"""Reliability drills (issue 7): bad input to every script, kills at random moments, determinism,
exact resume, and faults of distributed training.

1. Bad input: each script (np2h, vocab, train, evaluation, pmrp_evaluation, make_synthetic_data) is
   called in-process through errors.run on a corrupted private copy of the data and must answer with
   exit status 2, one `error: ...` line naming the file or option at fault, and no output left behind;
   two real subprocesses show that no traceback reaches the terminal either.
2. Kill drills: train.py and np2h.py are SIGKILLed at seeded random moments, and on purpose in the middle
   of a checkpoint or HDF5 write; whatever looks finished must be complete, and a resume or re-run must
   end exactly where an uninterrupted run ends.
3. Determinism: the same seed gives bit-identical checkpoints and evaluation results, whatever --workers.
4. Resume: k epochs + --resume equal N epochs straight, bit for bit.
5. Distributed faults: a --world_size 2 run whose peer dies or hangs ends with a message, in bounded time.

Training runs on a tiny synthetic dataset (make_synthetic_data --tiny) with tiny dimensions. Every run
uses one CPU thread, in-process (torch.set_num_threads) and in subprocesses (OMP_NUM_THREADS): the thread
count changes the order of float reductions, so runs are bit-comparable only at the same count, and
models this small only lose time to threads (a lot when other jobs share the cores).
"""
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor, as_completed

import h5py
import numpy as np
import pytest
import torch

import checkpoint
import data
import errors
import evaluation
import make_synthetic_data
import np2h
import pmrp_evaluation
import train
from model import SimilarityModel
import vocab as vocab_lib
from pmrp_com import pmrp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EPOCHS = 2
SLOW_WRITE_S = 0.25  # in the kill drills every checkpoint write stays open this long (SLOW_TRAIN)
# train.py with torch.save slowed down: the temporary file of every checkpoint stays there SLOW_WRITE_S
# before its rename, so that a kill can land in the middle of a checkpoint write on purpose.
SLOW_TRAIN = f"""
import runpy, sys, time, torch
save = torch.save
torch.save = lambda *args, **kwargs: (save(*args, **kwargs), time.sleep({SLOW_WRITE_S}))[0]
sys.argv[0] = {os.path.join(ROOT, "train.py")!r}
sys.path.insert(0, {ROOT!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""
FINISHED = re.compile(r"checkpoint_\d+\.pth\.tar|model_best\.pth\.tar")
TEMPORARY = re.compile(r"\..+\.tmp")  # fileio.atomic_path's names: hidden, never a finished file's name


def subprocess_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs with one thread (see the docstring)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make_synthetic_data --tiny (f30k_precomp only): 40/10/10 images, feat_dim 32. Do not modify."""
    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_data.main(["--tiny", "--datasets", "f30k_precomp", "--out_dir", str(root / "data"),
                              "--vocab_dir", str(root / "vocab"), "--ann_dir", str(root / "ann")])
    return root


def train_argv(data_root, run_dir, epochs=N_EPOCHS, *extra):
    """A tiny training run on `data_root` (a copy of `tiny`) writing to run_dir/ckpt and run_dir/log."""
    return ["--data_path", str(data_root / "data"), "--data_name", "f30k_precomp",
            "--vocab_path", str(data_root / "vocab"), "--model_name", str(run_dir / "ckpt"),
            "--logger_name", str(run_dir / "log"), "--img_dim", "32", "--word_dim", "16", "--embed_size", "32",
            "--sim_dim", "16", "--sgr_step", "1", "--batch_size", "16", "--num_epochs", str(epochs),
            "--device", "cpu", "--log_step", "1000", "--learning_rate", "0.005", "--warmup_epochs", "1",
            "--daa_weight", "1", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory, one_thread):
    """An uninterrupted N_EPOCHS run (in-process): the run directory, with ckpt/checkpoint_{0,1}.pth.tar."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert errors.run(train.main, train_argv(tiny, run_dir)) == 0
    return run_dir


@pytest.fixture(scope="module")
def saf_checkpoint(tiny, tmp_path_factory, one_thread):
    """A one-epoch SAF checkpoint on the tiny data."""
    run_dir = tmp_path_factory.mktemp("saf")
    assert errors.run(train.main, train_argv(tiny, run_dir, 1, "--module_name", "SAF")) == 0
    return run_dir / "ckpt" / "checkpoint_0.pth.tar"


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A private copy of the tiny dataset, to corrupt."""
    return shutil.copytree(tiny, tmp_path / "tiny")


@pytest.fixture
def synth_copy(synth, tmp_path):
    """A private copy of the session's synthetic data (data/, vocab/, coco_ann/), to corrupt."""
    root = shutil.copytree(synth.root, tmp_path / "synth")
    return types.SimpleNamespace(data=root / "data", vocab=root / "vocab", ann=root / "coco_ann",
                                 f30k=root / "data" / "f30k_precomp", coco=root / "data" / "coco_precomp")


def expect_error(capsys, main, argv, needles, never=()):
    """`main(argv)` refuses its input as SPEC section 6 says.

    Exit status 2; stderr is a single line `error: ...` holding every string of `needles` (the file or
    option at fault); no path of `never` (the outputs) exists, nor a temporary file of one.
    """
    assert errors.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles if isinstance(needles, list) else [needles]:
        assert str(needle) in err, (needle, err)
    for path in never:
        assert not os.path.exists(path), f"partial output left behind: {path}"
        assert not glob.glob(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.*.tmp")), path
    return err


def write_vocab(path, word2idx):
    path.write_text(json.dumps({"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()},
                                "idx": len(word2idx)}))


def differences(a, b, where="checkpoint"):
    """Paths at which two nested checkpoint contents differ (tensors compared bit for bit); [] if identical."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f"{where} (keys)"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}[{key!r}]")]
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def training_state_differences(path_a, path_b):
    """Differences of two checkpoints in everything but `opt` (whose paths and --resume differ by design):
    weights, optimizer and GradScaler state, RNG state, epoch, best rsum, iterations, vocabulary."""
    a, b = checkpoint.load_checkpoint(str(path_a)), checkpoint.load_checkpoint(str(path_b))
    del a["opt"], b["opt"]
    return differences(a, b)


# ------------------------------------------------------------------------------------------------
# 1. Bad input, script by script


@pytest.mark.parametrize("case", ["no_folder", "missing_split", "regions", "not_array", "truncated",
                                  "output_is_folder"])
def test_np2h_bad_input(synth_copy, capsys, case):
    folder = synth_copy.f30k
    argv = ["--data_path", str(synth_copy.data), "--data_name", "f30k_precomp"]
    test_ims = folder / "test_ims.npy"
    if case == "no_folder":
        argv[-1] = "nowhere_precomp"
        needle = synth_copy.data / "nowhere_precomp"
    elif case == "missing_split":  # train is fine, but every input is checked before anything is converted
        argv += ["--splits", "train", "val"]
        needle = folder / "val_ims.npy"
    elif case == "regions":
        np.save(test_ims, np.zeros((40, 10, 64), np.float32))
        needle = test_ims
    elif case == "not_array":
        test_ims.write_text("0.1 0.2\n")
        needle = test_ims
    elif case == "truncated":
        os.truncate(test_ims, os.path.getsize(test_ims) - 100)
        needle = test_ims
    elif case == "output_is_folder":
        (folder / "test.h5").mkdir()
        argv += ["--splits", "test"]
        needle = folder / "test.h5"
    never = [] if case == "output_is_folder" else [folder / f"{s}.h5" for s in ("train", "dev", "test")]
    expect_error(capsys, np2h.main, argv, needle, never)


@pytest.mark.parametrize("case", ["missing_dev", "empty", "non_utf8", "blank_line", "output_in_a_file"])
def test_vocab_bad_input(synth_copy, capsys, case):
    folder = synth_copy.f30k
    out_dir = synth_copy.vocab.parent / "new_vocab"
    train_caps, dev_caps = folder / "train_caps.txt", folder / "dev_caps.txt"
    if case == "missing_dev":
        dev_caps.unlink()
        needle = dev_caps
    elif case == "empty":
        train_caps.write_text("")
        needle = train_caps
    elif case == "non_utf8":
        dev_caps.write_bytes(dev_caps.read_bytes() + "un caf\xe9 noir\n".encode("latin-1"))
        needle = dev_caps
    elif case == "blank_line":
        lines = train_caps.read_text().splitlines()
        train_caps.write_text("\n".join(lines[:7] + [""] + lines[7:]) + "\n")
        needle = f"{train_caps}: line 8 is blank"
    elif case == "output_in_a_file":
        out_dir.write_text("a file, not a folder\n")
        needle = out_dir
    argv = ["--data_path", str(synth_copy.data), "--data_name", "f30k_precomp", "--vocab_path", str(out_dir)]
    expect_error(capsys, vocab_lib.main, argv, needle, [out_dir / "f30k_precomp_vocab.json"])


@pytest.mark.parametrize("case", ["n_testall", "feat_dim", "out_dir_is_a_file"])
def test_synthetic_maker_bad_input(tmp_path, capsys, case):
    out, vocab_dir, ann_dir = tmp_path / "data", tmp_path / "vocab", tmp_path / "ann"
    argv = ["--tiny", "--out_dir", str(out), "--vocab_dir", str(vocab_dir), "--ann_dir", str(ann_dir)]
    if case == "n_testall":
        argv = argv[1:] + ["--n_testall", "7"]
        needle = "--n_testall"
    elif case == "feat_dim":
        argv = argv[1:] + ["--feat_dim", "0"]
        needle = "--feat_dim"
    elif case == "out_dir_is_a_file":
        out.write_text("not a folder\n")
        needle = out
    never = [vocab_dir, ann_dir] + ([] if case == "out_dir_is_a_file" else [out])
    expect_error(capsys, make_synthetic_data.main, argv, needle, never)


TRAIN_CASES = ["no_vocab", "vocab_without_word2idx", "vocab_not_json", "empty_split", "blank_caption_line",
               "non_utf8_captions", "count_mismatch", "feature_shape", "features_other_dim", "features_other_regions",
               "resume_features_other_dim", "features_not_array", "h5_without_feat",
               "no_features", "no_dev_split", "batch_larger_than_split", "resume_missing", "resume_not_a_checkpoint",
               "resume_other_module", "init_from_other_module", "resume_other_dims", "resume_vocab_size",
               "resume_vocab_ids", "model_name_is_a_file", "world_size_above_gpus"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_input(tiny_copy, reference, saf_checkpoint, tmp_path, capsys, monkeypatch, case):
    folder, vocab_file = tiny_copy / "data" / "f30k_precomp", tiny_copy / "vocab" / "f30k_precomp_vocab.json"
    train_caps, train_ims = folder / "train_caps.txt", folder / "train_ims.npy"
    trained = str(reference / "ckpt" / "checkpoint_0.pth.tar")
    run_dir = tmp_path / "run"
    extra = []
    if case == "no_vocab":
        vocab_file.unlink()
        needle = vocab_file
    elif case == "vocab_without_word2idx":
        vocab_file.write_text(json.dumps({"idx2word": {"0": "<pad>"}, "idx": 1}))
        needle = [vocab_file, "word2idx"]
    elif case == "vocab_not_json":
        vocab_file.write_text("{'word2idx': ")
        needle = vocab_file
    elif case == "empty_split":
        train_caps.write_text("")
        needle = [train_caps, "empty"]
    elif case == "blank_caption_line":
        train_caps.write_text(train_caps.read_text().replace("\n", "\n\n", 1))
        needle = [train_caps, "line 2 is blank"]
    elif case == "non_utf8_captions":
        train_caps.write_bytes(b"\xff" + train_caps.read_bytes())
        needle = [train_caps, "UTF-8"]
    elif case == "count_mismatch":
        np.save(train_ims, np.load(train_ims)[:39])
        needle = [train_ims, train_caps]
    elif case == "feature_shape":
        np.save(train_ims, np.zeros((40, 36), np.float32))
        needle = [train_ims, "shape"]
    elif case == "features_other_dim":
        np.save(train_ims, np.zeros((40, 36, 24), np.float32))
        needle = [train_ims, "--img_dim 32"]
    elif case == "features_other_regions":
        np.save(folder / "dev_ims.npy", np.zeros((10, 20, 32), np.float32))
        needle = [folder / "dev_ims.npy", "20 regions", "--img_dim 32"]
    elif case == "resume_features_other_dim":  # features of dimension 24, the checkpoint was trained on 32
        for split, n in (("train", 40), ("dev", 10)):
            np.save(folder / f"{split}_ims.npy", np.zeros((n, 36, 24), np.float32))
        extra = ["--resume", trained]
        needle = [train_ims, trained]
    elif case == "features_not_array":
        train_ims.write_bytes(b"PK\x03\x04 not an array")
        needle = train_ims
    elif case == "h5_without_feat":
        with h5py.File(folder / "train.h5", "w") as f:
            f["features"] = np.zeros((40, 36, 32), np.float32)
        needle = [folder / "train.h5", "'feat'"]
    elif case == "no_features":
        train_ims.unlink()
        needle = train_ims
    elif case == "no_dev_split":
        (folder / "dev_caps.txt").unlink()
        needle = folder / "dev_caps.txt"
    elif case == "batch_larger_than_split":
        extra = ["--batch_size", "201"]
        needle = "--batch_size 201"
    elif case == "resume_missing":
        extra = ["--resume", str(tmp_path / "nowhere.pth.tar")]
        needle = tmp_path / "nowhere.pth.tar"
    elif case == "resume_not_a_checkpoint":
        (tmp_path / "notes.pth.tar").write_text("epoch 3 was good\n")
        extra = ["--resume", str(tmp_path / "notes.pth.tar")]
        needle = tmp_path / "notes.pth.tar"
    elif case in ("resume_other_module", "init_from_other_module"):
        extra = ["--resume" if case.startswith("resume") else "--init_from", str(saf_checkpoint), "--module_name", "SGR"]
        needle = [saf_checkpoint, "SAF"]
    elif case == "resume_other_dims":
        extra = ["--resume", trained, "--embed_size", "48"]
        needle = trained
    elif case == "resume_vocab_size":  # one word more than the checkpoint's embedding has rows
        words = json.loads(vocab_file.read_text())["word2idx"]
        write_vocab(vocab_file, {**words, "zebra-crossing": len(words)})
        extra = ["--resume", trained]
        needle = [vocab_file, trained]
    elif case == "resume_vocab_ids":  # same size, two words swapped: would silently scramble the captions
        words = json.loads(vocab_file.read_text())["word2idx"]
        a, b = list(words)[4:6]
        words[a], words[b] = words[b], words[a]
        write_vocab(vocab_file, words)
        extra = ["--resume", trained]
        needle = [vocab_file, trained]
    elif case == "model_name_is_a_file":
        run_dir.mkdir()
        (run_dir / "ckpt").write_text("not a folder\n")
        needle = run_dir / "ckpt"
    elif case == "world_size_above_gpus":  # one GPU pretended; refused before any process starts
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        extra = ["--world_size", "2"]
        needle = "--world_size 2"
    argv = train_argv(tiny_copy, run_dir, 1, *extra)
    if case == "world_size_above_gpus":
        argv[argv.index("--device") + 1] = "cuda"
    never = [run_dir / "log"] + ([] if case == "model_name_is_a_file" else [run_dir / "ckpt"])
    expect_error(capsys, train.main, argv, needle, never)


@pytest.mark.parametrize("case", ["shape", "transposed", "nan", "inf", "not_array", "missing", "captions_empty",
                                  "captions_non_utf8", "json_is_a_folder"])
def test_evaluation_sims_bad_input(synth_copy, tmp_path, capsys, case):
    sims, out = tmp_path / "sims.npy", tmp_path / "out" / "metrics.json"
    matrix = np.random.default_rng(0).random((40, 200)).astype(np.float32)
    test_caps = synth_copy.f30k / "test_caps.txt"
    needle = sims
    if case == "shape":
        matrix = matrix[:, :190]
    elif case == "transposed":
        matrix = matrix.T
        needle = [sims, "transposed"]
    elif case == "nan":
        matrix[3, 17] = np.nan
        needle = [sims, "[3, 17]"]
    elif case == "inf":
        matrix[0, 0] = -np.inf
    elif case == "captions_empty":
        test_caps.write_text("")
        needle = test_caps
    elif case == "captions_non_utf8":
        test_caps.write_bytes(test_caps.read_bytes().replace(b"a", b"\xe0", 1))
        needle = test_caps
    elif case == "json_is_a_folder":
        out.mkdir(parents=True)
        needle = out
    np.save(sims, matrix)
    if case == "not_array":
        sims.write_text("1 2 3\n")
    elif case == "missing":
        sims.unlink()
    argv = ["--sims", str(sims), "--data_path", str(synth_copy.data), "--data_name", "f30k_precomp",
            "--split", "test", "--json", str(out)]
    expect_error(capsys, evaluation.main, argv, needle, [] if case == "json_is_a_folder" else [out])


class RunsCode:
    """Unpickling this would run a shell command: a checkpoint must never be unpickled with full pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("case", ["missing", "text", "tensor", "runs_code", "vocab_size", "vocab_ids",
                                  "no_features", "count_mismatch", "features_other_dim", "features_other_regions",
                                  "world_size_above_gpus"])
def test_evaluation_model_bad_input(tiny_copy, reference, tmp_path, capsys, monkeypatch, case):
    ckpt = tmp_path / "model.pth.tar"
    shutil.copy(reference / "ckpt" / "model_best.pth.tar", ckpt)
    folder, vocab_file = tiny_copy / "data" / "f30k_precomp", tiny_copy / "vocab" / "f30k_precomp_vocab.json"
    out, sims = tmp_path / "metrics.json", tmp_path / "sims.npy"
    extra = []
    needle = ckpt
    if case == "missing":
        ckpt.unlink()
    elif case == "text":
        ckpt.write_text("model weights: see the cluster\n")
    elif case == "tensor":
        torch.save(torch.zeros(3), ckpt)
    elif case == "runs_code":
        torch.save({"model": RunsCode(tmp_path / "ran"), "opt": None}, ckpt)
        needle = [ckpt, "posix.system"]  # named, and refused unread
    elif case == "vocab_size":
        words = json.loads(vocab_file.read_text())["word2idx"]
        write_vocab(vocab_file, {w: i for w, i in words.items() if i < len(words) - 1})
        needle = [vocab_file, ckpt]
    elif case == "vocab_ids":
        words = json.loads(vocab_file.read_text())["word2idx"]
        a, b = list(words)[10:12]
        words[a], words[b] = words[b], words[a]
        write_vocab(vocab_file, words)
        needle = [vocab_file, ckpt, "other ids"]
    elif case == "no_features":
        (folder / "test_ims.npy").unlink()
        needle = folder / "test_ims.npy"
    elif case == "count_mismatch":
        np.save(folder / "test_ims.npy", np.load(folder / "test_ims.npy")[:9])
        needle = folder / "test_ims.npy"
    elif case == "features_other_dim":
        np.save(folder / "test_ims.npy", np.zeros((10, 36, 24), np.float32))
        needle = [folder / "test_ims.npy", ckpt, "24 values"]
    elif case == "features_other_regions":
        np.save(folder / "test_ims.npy", np.zeros((10, 20, 32), np.float32))
        needle = [folder / "test_ims.npy", ckpt, "20 regions"]
    elif case == "world_size_above_gpus":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        extra = ["--world_size", "2", "--device", "cuda"]
        needle = "--world_size 2"
    argv = ["--model_path", str(ckpt), "--data_path", str(tiny_copy / "data"), "--vocab_path",
            str(tiny_copy / "vocab"), "--split", "test", "--json", str(out), "--save_sims", str(sims)]
    argv += extra or ["--device", "cpu"]
    expect_error(capsys, evaluation.main, argv, needle, [out, sims])
    assert not (tmp_path / "ran").exists()  # the pickle's command never ran


@pytest.mark.parametrize("case", ["shape", "transposed", "nan", "rows_vs_ids", "no_ids", "no_annotation_file",
                                  "no_annotations", "ann_not_json", "id_not_in_images", "json_is_a_folder"])
def test_pmrp_bad_input(synth_copy, tmp_path, capsys, case):
    sims, out = tmp_path / "sims.npy", tmp_path / "pmrp.json"
    instances, ids = synth_copy.ann / "instances_val2014.json", synth_copy.coco / "testall_ids.txt"
    matrix = np.random.default_rng(1).random((50, 250))
    needle = sims
    if case == "shape":
        matrix = matrix[:, :240]
    elif case == "transposed":
        matrix = matrix.T
        needle = [sims, "transposed"]
    elif case == "nan":
        matrix[7, 7] = np.nan
    elif case == "rows_vs_ids":  # a 40-image matrix for the 50-image testall
        matrix = matrix[:40, :200]
        needle = [ids, "200 captions"]
    elif case == "no_ids":
        ids.unlink()
        needle = ids
    elif case == "no_annotation_file":
        instances.unlink()
        needle = instances
    elif case == "no_annotations":
        ann = json.loads(instances.read_text())
        del ann["annotations"]
        instances.write_text(json.dumps(ann))
        needle = [instances, "annotations"]
    elif case == "ann_not_json":
        instances.write_text('{"images": [')
        needle = instances
    elif case == "id_not_in_images":
        ann = json.loads(instances.read_text())
        ann["images"] = ann["images"][1:]
        instances.write_text(json.dumps(ann))
        needle = [instances, "not among its images"]
    elif case == "json_is_a_folder":
        out.mkdir()
        needle = out
    np.save(sims, matrix)
    argv = ["--path1", str(sims), "--n_fold", "5", "--dataset_root", str(synth_copy.coco), "--ann_root",
            str(synth_copy.ann), "--json", str(out)]
    expect_error(capsys, pmrp_evaluation.main, argv, needle, [] if case == "json_is_a_folder" else [out])


def test_pmrp_drops_images_without_instances(synth_copy, tmp_path):
    """Images listed in `images` but without any instance are dropped as queries and from the galleries
    (PCME's rule): the result equals PMRP of the matrix with those images and their captions removed."""
    instances = synth_copy.ann / "instances_val2014.json"
    ann = json.loads(instances.read_text())
    image_ids = pmrp.read_image_ids(synth_copy.coco / "testall_ids.txt", 50)
    stripped = int(image_ids[7])  # one more image without instances than the synthetic data has
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != stripped]
    instances.write_text(json.dumps(ann))
    sims = np.random.default_rng(2).random((50, 250))
    np.save(tmp_path / "sims.npy", sims)
    out = tmp_path / "pmrp.json"
    argv = ["--path1", str(tmp_path / "sims.npy"), "--n_fold", "0", "--dataset_root", str(synth_copy.coco),
            "--ann_root", str(synth_copy.ann), "--json", str(out)]
    assert errors.run(pmrp_evaluation.main, argv) == 0
    result = json.loads(out.read_text())
    codes = pmrp.instance_codes(instances, image_ids)
    kept = np.flatnonzero(codes.any(1))
    assert 7 not in kept and result["provenance"]["images_without_instances"] == 50 - len(kept) == 2
    captions = (5 * kept[:, None] + np.arange(5)).ravel()
    expected = pmrp.pmrp_scores(sims[np.ix_(kept, captions)], codes[kept], n_fold=0)
    for direction in ("i2t", "t2i"):
        assert result[direction]["pmrp_thres"] == pytest.approx(expected[direction]["pmrp_thres"], rel=1e-12)
        assert result[direction]["pmr1"] == pytest.approx(expected[direction]["pmr1"], rel=1e-12)


def test_no_traceback_reaches_the_terminal(tmp_path):
    """The real entry points: a text file as features for np2h.py, a NaN matrix for evaluation.py."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train_ims.npy").write_text("not numbers\n")
    np.save(tmp_path / "sims.npy", np.full((1, 5), np.nan))
    (tmp_path / "x" / "test_caps.txt").write_text("a dog\na cat\ntwo dogs\nthe cat\nsome dog\n")
    commands = [["np2h.py", "--data_path", str(tmp_path), "--data_name", "x"],
                ["evaluation.py", "--sims", str(tmp_path / "sims.npy"), "--data_path", str(tmp_path),
                 "--data_name", "x", "--split", "test", "--json", str(tmp_path / "out.json")]]
    for script, *args in commands:
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                              env=subprocess_env(), timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert sorted(os.listdir(tmp_path / "x")) == ["test_caps.txt", "train_ims.npy"]
    assert not (tmp_path / "out.json").exists()


def test_outputs_get_the_usual_permissions(tmp_path):
    """Atomically written files get the mode open() gives (0o666 less the umask), not mkstemp's 0o600:
    checkpoints and results must stay readable to the user's group as before."""
    import fileio

    old = os.umask(0o022)
    try:
        fileio.write_json({"a": 1}, tmp_path / "out.json")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.json").st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------
# 2. Kill drills


def wait_until(condition, proc, timeout=120):
    """Poll `condition` every 10 ms; True once it holds, False if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for the process")


def run_and_kill(argv, run_dir, target, delay):
    """Start train.py on `argv` and SIGKILL it: `delay` s after training starts (target None), or `delay` s
    after the temporary file of checkpoint `target` appears, i.e. during its (slowed-down) write."""
    log_path = run_dir / "train.log"
    run_dir.mkdir(parents=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        started = wait_until(lambda: "options:" in log_path.read_text(errors="replace"), proc)
        assert started, log_path.read_text(errors="replace")[-2000:]
        if target is not None:
            wait_until(lambda: glob.glob(str(run_dir / "ckpt" / f".{target}.pth.tar.*.tmp")), proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def probe_batch(tiny):
    """Four test items as a collated batch (images, captions, lengths) for a forward pass."""
    vocab = vocab_lib.deserialize_vocab(str(tiny / "vocab" / "f30k_precomp_vocab.json"))
    dataset = data.PrecompDataset(str(tiny / "data"), "f30k_precomp", "test", vocab)
    return data.collate_fn([dataset[j] for j in (0, 7, 14, 21)])[:3]


def check_after_kill(tiny, run_dir, argv, reference, batch):
    """What a killed run left: only finished checkpoints that load and score, and hidden temporary files;
    a resume from the latest checkpoint ends exactly where the uninterrupted run ends.

    Returns the names found in the checkpoint folder right after the kill.
    """
    ckpt_dir = run_dir / "ckpt"
    names = sorted(os.listdir(ckpt_dir)) if ckpt_dir.exists() else []
    assert all(FINISHED.fullmatch(n) or TEMPORARY.fullmatch(n) for n in names), names
    for name in filter(FINISHED.fullmatch, names):
        ckpt = checkpoint.load_checkpoint(str(ckpt_dir / name))
        model = SimilarityModel.from_checkpoint(ckpt, name)
        with torch.no_grad():
            scores = model(*batch)
        assert scores.shape == (4, 4) and torch.isfinite(scores).all(), name
    epochs = [int(n[len("checkpoint_"):-len(".pth.tar")]) for n in names if n.startswith("checkpoint_")]
    if epochs:
        latest = ckpt_dir / f"checkpoint_{max(epochs)}.pth.tar"
        assert checkpoint.load_checkpoint(str(latest))["epoch"] == max(epochs) + 1
        assert errors.run(train.main, argv + ["--resume", str(latest)]) == 0
        final = f"checkpoint_{N_EPOCHS - 1}.pth.tar"
        assert training_state_differences(ckpt_dir / final, reference / "ckpt" / final) == []
    return names


@pytest.mark.slow
def test_kill_training_at_random_moments(tiny, reference, probe_batch, tmp_path):
    """20 SIGKILLs of train.py, half at random moments of a run, half in the middle of a checkpoint write.

    Trials run three at a time (much of a trial is start-up and slowed writes); each is checked, and
    resumed in-process, as soon as it has been killed.
    """
    rng = random.Random(20221128)
    targets = [f"checkpoint_{e}" for e in range(N_EPOCHS)] + ["model_best"]
    # A run takes ~2 s after start-up: N_EPOCHS x (training + validation) + ~4 slowed writes.
    trials = [(None, rng.uniform(0.0, 2.5)) for _ in range(10)]
    trials += [(rng.choice(targets), rng.uniform(0.0, SLOW_WRITE_S / 3)) for _ in range(10)]
    mid_write = 0
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {}
        for i, (target, delay) in enumerate(trials):
            run_dir = tmp_path / f"trial{i}"
            argv = train_argv(tiny, run_dir)
            futures[pool.submit(run_and_kill, argv, run_dir, target, delay)] = (run_dir, argv, target)
        for future in as_completed(futures):
            run_dir, argv, target = futures[future]
            future.result()
            names = check_after_kill(tiny, run_dir, argv, reference, probe_batch)
            if target is not None:  # the kill landed before the rename: the temporary file is all there is
                tmp_left = any(n.startswith(f".{target}.pth.tar.") for n in names)
                mid_write += tmp_left and f"{target}.pth.tar" not in names
    # Each of these kills lands within a third of the write's window; allow for a busy machine.
    assert mid_write >= 7, mid_write


@pytest.mark.slow
def test_kill_np2h_at_random_moments(tmp_path):
    """10 SIGKILLs of np2h.py converting three splits: any .h5 that exists is complete, the re-run finishes
    the rest, and the result equals the .npy files."""
    folder = tmp_path / "x"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {s: rng.random((2000, 36, 64), dtype=np.float32) for s in ("a", "b", "c")}
    for split, array in arrays.items():
        np.save(folder / f"{split}_ims.npy", array)
    argv = ["--data_path", str(tmp_path), "--data_name", "x"]
    drill = random.Random(7)
    mid_write = 0
    for trial in range(10):
        target = drill.choice(["a", "b", "c"]) if trial % 2 else None
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "np2h.py"), *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
        try:
            if target is None:
                time.sleep(drill.uniform(0.2, 1.5))  # start-up ~0.4 s, then ~0.2 s per split
            else:
                wait_until(lambda: glob.glob(str(folder / f".{target}.h5.*.tmp")), proc)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        names = os.listdir(folder)
        assert all(n.endswith("_ims.npy") or n in ("a.h5", "b.h5", "c.h5") or TEMPORARY.fullmatch(n)
                   for n in names), names
        mid_write += target is not None and f"{target}.h5" not in names
        for split, array in arrays.items():
            if f"{split}.h5" in names:  # renamed into place means finished
                with h5py.File(folder / f"{split}.h5", "r") as f:
                    assert np.array_equal(f["feat"][:], array), split
        assert errors.run(np2h.main, argv) == 0
        for split, array in arrays.items():
            with h5py.File(folder / f"{split}.h5", "r") as f:
                assert np.array_equal(f["feat"][:], array), split
            os.remove(folder / f"{split}.h5")
    assert mid_write >= 3, mid_write


# ------------------------------------------------------------------------------------------------
# 3. Determinism and 4. exact resume


def test_same_seed_same_checkpoints_and_evaluation(tiny, reference, tmp_path):
    """Same seed and data on the CPU: identical checkpoints and evaluation JSON, with --workers 0 or 2 in
    training and in evaluation."""
    for name, extra in (("again", []), ("workers2", ["--workers", "2"])):
        assert errors.run(train.main, train_argv(tiny, tmp_path / name, N_EPOCHS, *extra)) == 0
        for ckpt in [f"checkpoint_{e}.pth.tar" for e in range(N_EPOCHS)] + ["model_best.pth.tar"]:
            assert training_state_differences(tmp_path / name / "ckpt" / ckpt, reference / "ckpt" / ckpt) == []
    reports = []
    evaluations = [(reference, "0"), (tmp_path / "again", "0"), (tmp_path / "workers2", "0"), (reference, "2")]
    for i, (run_dir, workers) in enumerate(evaluations):
        out = tmp_path / f"evaluation{i}.json"
        argv = ["--model_path", str(run_dir / "ckpt" / "model_best.pth.tar"), "--data_path", str(tiny / "data"),
                "--vocab_path", str(tiny / "vocab"), "--split", "test", "--device", "cpu", "--workers", workers,
                "--json", str(out)]
        assert errors.run(evaluation.main, argv) == 0
        report = json.loads(out.read_text())
        options = report.pop("provenance")["opt"][0]
        for where in ("model_name", "logger_name", "workers"):  # the paths and the option that differ
            options.pop(where)
        reports.append((report, options))
    assert all(report == reports[0] for report in reports[1:])


def test_resume_equals_straight_run(tiny, reference, tmp_path):
    """1 epoch, then --resume checkpoint_0 to N_EPOCHS: bit-identical to N_EPOCHS straight.

    Exact because the checkpoint holds everything the next epoch depends on: weights, Adam's moments and
    step counts, the global RNG state (dropout), best rsum and iteration count; the data order depends
    only on (seed, epoch) through the sampler.
    """
    assert errors.run(train.main, train_argv(tiny, tmp_path, 1)) == 0
    first = tmp_path / "ckpt" / "checkpoint_0.pth.tar"
    assert training_state_differences(first, reference / "ckpt" / "checkpoint_0.pth.tar") == []
    assert errors.run(train.main, train_argv(tiny, tmp_path, N_EPOCHS, "--resume", str(first))) == 0
    for ckpt in [f"checkpoint_{e}.pth.tar" for e in range(1, N_EPOCHS)] + ["model_best.pth.tar"]:
        assert training_state_differences(tmp_path / "ckpt" / ckpt, reference / "ckpt" / ckpt) == []


# ------------------------------------------------------------------------------------------------
# 5. Distributed faults


def spawned_workers(pid):
    """Pids of the training processes mp.spawn started under `pid` (not its resource tracker)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(child)
        except FileNotFoundError:
            pass
    return sorted(workers)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_distributed_run_ends_when_a_peer_fails(tiny, tmp_path, fault):
    """--world_size 2 on the CPU (gloo): SIGKILL one process, or SIGSTOP it (then --dist_timeout makes the
    other give up); the run must exit 2 with a one-line error, no traceback, in bounded time."""
    timeout_s = 10
    argv = train_argv(tiny, tmp_path, 1000, "--world_size", "2", "--dist_timeout", str(timeout_s))
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=subprocess_env())
    workers = []
    try:
        # rank 0 logs its options after the DDP set-up, which both processes must have reached
        assert wait_until(lambda: "options:" in log_path.read_text(errors="replace"), proc, timeout=180)
        time.sleep(0.5)  # into the training loop
        workers = spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        faulted = time.monotonic()
        returncode = proc.wait(timeout=90)
        elapsed = time.monotonic() - faulted
    finally:
        proc.kill()
        proc.wait()
        for worker in workers:  # a stopped process that survived would hang around forever
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log_path.read_text(errors="replace")
    errors_printed = [line for line in output.splitlines() if line.startswith("error: ")]
    assert returncode == 2 and "Traceback" not in output, output[-3000:]
    assert errors_printed and errors_printed[-1].startswith("error: training process "), errors_printed
    if fault == "hung":
        assert any("lost contact" in line for line in errors_printed), errors_printed
    # a hung peer costs --dist_timeout, then a few seconds for killing it; a dead one is noticed at once
    assert elapsed < (timeout_s if fault == "hung" else 0) + 20, elapsed
