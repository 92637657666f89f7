"""np2h.py --check on copies of the synthetic datasets, clean and with one planted defect each: one line
per problem (naming its file) and exit 2, or one summary line and exit 0; and a dataset with the
published Flickr30K counts (features allocated in HDF5 without being written) passes without --any_counts."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

import np2h


@pytest.fixture
def copy(synth, tmp_path):
    """A writable copy of the session's data, vocabularies and annotations: (data_path, vocab_path, ann_root)."""
    for name in ("data", "vocab", "coco_ann"):
        shutil.copytree(os.path.join(synth.root, name), tmp_path / name)
    return tmp_path / "data", tmp_path / "vocab", tmp_path / "coco_ann"


def check(copy, data_name="coco_precomp", *extra, img_dim="64"):
    """np2h.main --check: (exit code, printed lines)."""
    data_path, vocab_path, ann_root = copy
    argv = ["--check", "--data_path", str(data_path), "--data_name", data_name, "--vocab_path", str(vocab_path),
            "--ann_root", str(ann_root), "--img_dim", img_dim, *extra]
    try:
        np2h.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code


def lines(capsys):
    out, err = capsys.readouterr()
    assert err == ""
    return out.splitlines()


def drop_lines(path, count):
    with open(path, encoding="utf-8") as f:
        kept = f.readlines()[:-count]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


@pytest.mark.parametrize("data_name", ["coco_precomp", "f30k_precomp"])
def test_clean_dataset_gives_one_summary_line(copy, capsys, data_name):
    assert check(copy, data_name, "--any_counts") == 0
    (line,) = lines(capsys)
    folder = os.path.join(copy[0], data_name)
    assert line.startswith(f"{folder}: ready: train 200 images / 1,000 captions (npy), dev 40 images / 200 captions")
    assert "features (36, 64)" in line and f"{data_name}_vocab.json" in line
    assert ("testall 50 images / 250 captions" in line and "without instances: 1" in line) == (data_name == "coco_precomp")


def test_published_counts_are_checked_without_any_counts(copy, capsys):
    """The synthetic splits are not the published ones: one line per split, naming its caption file."""
    assert check(copy) == 2
    out = lines(capsys)
    assert len(out) == 4
    for line, split, published in zip(out, ("train", "dev", "test", "testall"),
                                      ("113,287 / 566,435", "5,000 / 25,000", "1,000 / 5,000", "5,000 / 25,000")):
        assert line.startswith(os.path.join(copy[0], "coco_precomp", f"{split}_caps.txt"))
        assert f"the published {split} split has {published}" in line


def plant(copy, defect):
    """Plant one defect in the copy's coco_precomp; returns (file the line must name, words it must contain)."""
    data_path, vocab_path, ann_root = copy
    folder = data_path / "coco_precomp"
    if defect == "missing_captions":
        os.remove(folder / "dev_caps.txt")
        return folder / "dev_caps.txt", "not found"
    if defect == "missing_features":
        os.remove(folder / "test_ims.npy")
        return folder / "test_ims.npy", "not found"
    if defect == "regions":
        np.save(folder / "test_ims.npy", np.zeros((40, 35, 64), dtype=np.float32))
        return folder / "test_ims.npy", "35 regions of 64 values"
    if defect == "dim":
        np.save(folder / "dev_ims.npy", np.zeros((40, 36, 32), dtype=np.float32))
        return folder / "dev_ims.npy", "36 regions of 32 values"
    if defect == "caption_count":
        drop_lines(folder / "test_caps.txt", 1)
        return folder / "test_ims.npy", "do not match the 199 captions"
    if defect == "nan":
        features = np.load(folder / "dev_ims.npy")
        features[-1, 3, 5] = np.nan
        np.save(folder / "dev_ims.npy", features)
        return folder / "dev_ims.npy", "image 39 has NaN"
    if defect == "stale_h5":
        with h5py.File(folder / "test.h5", "w") as f:  # what the loader would read instead of test_ims.npy
            f.create_dataset("feat", data=np.zeros((40, 36, 64), dtype=np.float64))
        return folder / "test.h5", "does not hold the float32 (40, 36, 64) features"
    if defect == "missing_ids":
        os.remove(folder / "testall_ids.txt")
        return folder / "testall_ids.txt", "not found"
    if defect == "short_ids":
        drop_lines(folder / "testall_ids.txt", 5)
        return folder / "testall_ids.txt", "245 caption lines, but"
    if defect == "missing_vocab":
        os.remove(vocab_path / "coco_precomp_vocab.json")
        return vocab_path / "coco_precomp_vocab.json", "not found"
    if defect == "broken_vocab":
        (vocab_path / "coco_precomp_vocab.json").write_text(json.dumps({"idx2word": {}}), encoding="utf-8")
        return vocab_path / "coco_precomp_vocab.json", "no 'word2idx'"
    if defect == "missing_annotations":
        os.remove(ann_root / "instances_val2014.json")
        return ann_root / "instances_val2014.json", "not found"
    if defect == "wrong_annotations":  # another split's annotation file: the testall images are not in it
        (ann_root / "instances_val2014.json").write_text(json.dumps({"images": [], "annotations": []}), encoding="utf-8")
        return ann_root / "instances_val2014.json", "are not among its images"
    raise ValueError(defect)


DEFECTS = ["missing_captions", "missing_features", "regions", "dim", "caption_count", "nan", "stale_h5", "missing_ids",
           "short_ids", "missing_vocab", "broken_vocab", "missing_annotations", "wrong_annotations"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_one_line_naming_its_file(copy, capsys, defect):
    path, words = plant(copy, defect)
    assert check(copy, "coco_precomp", "--any_counts") == 2
    (line,) = lines(capsys)
    assert line.startswith(f"{path}: ") and words in line


def test_every_problem_is_reported(copy, capsys):
    """Defects in several files: a line for each, not only the first."""
    planted = [plant(copy, defect) for defect in ("missing_captions", "regions", "missing_vocab", "short_ids")]
    assert check(copy, "coco_precomp", "--any_counts") == 2
    out = lines(capsys)
    assert len(out) == len(planted)
    for (path, words), line in zip(planted, out):
        assert line.startswith(f"{path}: ") and words in line


def test_published_flickr30k_counts_pass(tmp_path, synth, capsys):
    """f30k_precomp with the published counts (train 29,000 / 145,000 with one feature row per image; dev
    1,014 / 5,070 and test 1,000 / 5,000 with one row per caption, as SCAN's files have them) and (36, 2048)
    features: one summary line. The .h5 files are allocated, not written (HDF5 stores no unwritten chunk)."""
    folder = tmp_path / "data" / "f30k_precomp"
    folder.mkdir(parents=True)
    for split, images, rows in (("train", 29000, 29000), ("dev", 1014, 5070), ("test", 1000, 5000)):
        (folder / f"{split}_caps.txt").write_text("a dog runs\n" * (5 * images), encoding="utf-8")
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f.create_dataset("feat", shape=(rows, 36, 2048), dtype=np.float32, chunks=(1, 36, 2048))
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    shutil.copy(os.path.join(synth.vocab_path, "f30k_precomp_vocab.json"), vocab)
    code = check((tmp_path / "data", vocab, tmp_path / "no_ann"), "f30k_precomp", img_dim="2048")
    (line,) = lines(capsys)
    assert code == 0 and line.startswith(f"{folder}: ready: train 29,000 images / 145,000 captions (h5), "
                                         f"dev 1,014 images / 5,070 captions (h5), test 1,000 images / 5,000 captions")
    assert "counts as published" in line
