"""Data side: loaders (alignment, layouts, dev cut, lazy HDF5), relevance blocks, np2h, vocabulary,
the synthetic maker, and every bad input of these files (SPEC sections 3, 5, 6)."""
import argparse
import filecmp
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import data
import errors
import make_synthetic_data
import np2h
import vocab as vocab_module
from tools.baselines.tfidf_dense import relevance_dense
from errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_vocab(synth, name="f30k_precomp"):
    return vocab_module.deserialize_vocab(os.path.join(synth.vocab_path, f"{name}_vocab.json"))


def copy_split(synth, tmp_path, split="test", name="f30k_precomp"):
    """A private copy of one split (captions + features) under tmp_path/data/name; returns (data_path, folder)."""
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    for suffix in ("_caps.txt", "_ims.npy"):
        shutil.copy(os.path.join(synth.data_path, name, split + suffix), folder / (split + suffix))
    return str(tmp_path / "data"), folder


def expect_one_line_error(capsys, main, argv, needle):
    assert errors.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith((".tmp", ".h5", ".json")))


# ------------------------------------------------------------------------------------------------
# Loaders


def test_train_loader_alignment_relevance_and_determinism(synth):
    vocab = load_vocab(synth)
    opt = argparse.Namespace(data_path=synth.data_path, data_name="f30k_precomp", batch_size=32, workers=0, seed=3)
    loader = data.get_train_loader(opt, vocab, distributed=False)
    dataset = loader.dataset
    feats = np.load(os.path.join(synth.data_path, "f30k_precomp", "train_ims.npy"))
    dense = relevance_dense(dataset.captions)
    drawn = list(loader.sampler)  # the sampler's order; each batch is 32 consecutive draws
    seen = []
    for images, captions, lengths, caption_ids, image_ids, M in loader:
        B = len(caption_ids)
        # the original collate's order: longest caption first, equal lengths in draw order
        draws = drawn[len(seen):len(seen) + B]
        n_words = {j: len(vocab_module.encode_caption(vocab, dataset.captions[j])) for j in draws}
        assert caption_ids.tolist() == sorted(draws, key=lambda j: -n_words[j])
        assert images.shape == (B, 36, synth.feat_dim) and images.dtype == torch.float32
        assert captions.dtype == torch.long and lengths.shape == (B,) and M.shape == (B, B) and M.dtype == torch.float32
        assert torch.equal(image_ids, caption_ids // 5)
        np.testing.assert_array_equal(images.numpy(), feats[image_ids.numpy()])
        for row, j in enumerate(caption_ids.tolist()):
            expected = vocab_module.encode_caption(vocab, dataset.captions[j])
            assert lengths[row] == len(expected) and captions[row, :len(expected)].tolist() == expected
            assert not captions[row, len(expected):].any()
        np.testing.assert_allclose(M.numpy(), dense[np.ix_(image_ids.numpy(), caption_ids.numpy())], atol=1e-6)
        seen += caption_ids.tolist()
    assert sorted(seen) == list(range(len(dataset)))  # every caption once per epoch
    again = [ids.tolist() for _, _, _, ids, _, _ in data.get_train_loader(opt, vocab, distributed=False)]
    assert sum(again, []) == seen  # same seed, same order
    loader.sampler.set_epoch(1)
    assert [ids.tolist() for _, _, _, ids, _, _ in loader][0] != seen[:32]


def test_train_loader_drops_a_last_batch_of_one(synth):
    opt = argparse.Namespace(data_path=synth.data_path, data_name="f30k_precomp", batch_size=999, workers=0, seed=0)
    loader = data.get_train_loader(opt, load_vocab(synth), distributed=False)  # 1000 captions = 999 + 1
    assert [len(batch[3]) for batch in loader] == [999]


def test_eval_loaders_cover_images_and_captions_in_order(synth):
    vocab = load_vocab(synth, "coco_precomp")
    image_loader, caption_loader, dataset = data.get_eval_loaders(synth.data_path, "coco_precomp", "testall", vocab, 16, 0)
    feats = np.load(os.path.join(synth.coco_root, "testall_ims.npy"))
    images, ids = zip(*image_loader)
    assert torch.cat(ids).tolist() == list(range(50)) and dataset.n_images == 50
    np.testing.assert_array_equal(torch.cat(images).numpy(), feats)
    caption_ids = torch.cat([ids for _, _, ids in caption_loader]).tolist()
    assert caption_ids == list(range(250))
    first, lengths, _ = next(iter(caption_loader))
    assert first[0, :lengths[0]].tolist() == vocab_module.encode_caption(vocab, dataset.captions[0])


def test_one_row_per_caption_features(synth, tmp_path):
    data_path, folder = copy_split(synth, tmp_path)
    feats = np.load(folder / "test_ims.npy")
    np.save(folder / "test_ims.npy", np.repeat(feats, 5, axis=0))
    dataset = data.PrecompDataset(data_path, "f30k_precomp", "test", load_vocab(synth))
    assert dataset.features.rows_per_image == 5 and dataset.n_images == 40 and len(dataset) == 200
    for j in (0, 7, 199):
        image, _, caption_index, image_index = dataset[j]
        assert (caption_index, image_index) == (j, j // 5)
        np.testing.assert_array_equal(image.numpy(), feats[j // 5])


def test_dev_cut(synth, monkeypatch):
    vocab = load_vocab(synth)
    assert data.PrecompDataset(synth.data_path, "f30k_precomp", "dev", vocab).n_captions == 200  # 200 < 5000
    monkeypatch.setattr(data, "DEV_MAX_CAPTIONS", 50)
    dev = data.PrecompDataset(synth.data_path, "f30k_precomp", "dev", vocab)
    assert (dev.n_captions, dev.n_images, dev.relevance.n_captions) == (50, 10, 50)
    np.testing.assert_allclose(dev.relevance.matrix(), relevance_dense(dev.captions), atol=1e-6)  # fit on the cut
    image_loader, caption_loader, cut = data.get_eval_loaders(synth.data_path, "f30k_precomp", "test", vocab, 8, 0,
                                                              max_captions=25)
    assert (cut.n_images, sum(len(b[0]) for b in image_loader), sum(len(b[0]) for b in caption_loader)) == (5, 5, 25)
    with pytest.raises(InputError, match="multiple of 5"):
        data.PrecompDataset(synth.data_path, "f30k_precomp", "test", vocab, max_captions=7)


def test_lazy_hdf5_in_workers(synth, tmp_path):
    data_path, folder = copy_split(synth, tmp_path)
    assert errors.run(np2h.main, ["--data_path", data_path, "--data_name", "f30k_precomp"]) == 0
    os.remove(folder / "test_ims.npy")  # the loader must read the .h5
    vocab = load_vocab(synth)
    image_loader, caption_loader, dataset = data.get_eval_loaders(data_path, "f30k_precomp", "test", vocab, 8, 2)
    store = dataset.features
    assert store.kind == "h5" and store._array is None  # nothing opened in the parent
    assert len(pickle.dumps(store)) < 4096
    images = torch.cat([b[0] for b in image_loader]).numpy()
    np.testing.assert_array_equal(images, np.load(os.path.join(synth.data_path, "f30k_precomp", "test_ims.npy")))
    assert store._array is None
    # training batches from the .h5, relevance blocks computed in the workers
    for suffix in ("_caps.txt", "_ims.npy"):
        shutil.copy(os.path.join(synth.data_path, "f30k_precomp", "train" + suffix), folder / ("train" + suffix))
    assert errors.run(np2h.main, ["--data_path", data_path, "--data_name", "f30k_precomp", "--splits", "train"]) == 0
    os.remove(folder / "train_ims.npy")
    opt = argparse.Namespace(data_path=data_path, data_name="f30k_precomp", batch_size=100, workers=2, seed=0)
    loader = data.get_train_loader(opt, vocab, False)
    feats = np.load(os.path.join(synth.data_path, "f30k_precomp", "train_ims.npy"))
    for images, _, _, caption_ids, image_ids, M in loader:
        np.testing.assert_array_equal(images.numpy(), feats[image_ids.numpy()])
        np.testing.assert_array_equal(M.numpy(), loader.dataset.relevance.block(image_ids.numpy(), caption_ids.numpy()))
    assert loader.dataset.features._array is None


def test_distributed_sampler_splits_the_data(synth, tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        opt = argparse.Namespace(data_path=synth.data_path, data_name="f30k_precomp", batch_size=64, workers=0, seed=0)
        loader = data.get_train_loader(opt, load_vocab(synth), distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and loader.sampler.num_replicas == 1
        assert sorted(torch.cat([b[3] for b in loader]).tolist()) == list(range(1000))
    finally:
        dist.destroy_process_group()


def test_tokenize_and_encode(synth):
    assert vocab_module.tokenize("A dog, running.") == ["a", "dog", ",", "running", "."]
    vocab = load_vocab(synth)
    ids = vocab_module.encode_caption(vocab, "A dog, zzzunknown.")
    assert ids[0] == vocab("<start>") == 1 and ids[-1] == vocab("<end>") == 2 and vocab("<unk>") == 3
    assert ids[1:-1] == [vocab("a"), vocab("dog"), vocab(","), 3, vocab(".")]


def test_relevance_block_matches_dense(synth):
    dataset = data.PrecompDataset(synth.data_path, "coco_precomp", "test", load_vocab(synth, "coco_precomp"))
    dense = relevance_dense(dataset.captions)
    rng = np.random.default_rng(0)
    image_ids, caption_ids = rng.integers(0, 40, 17), rng.integers(0, 200, 23)
    np.testing.assert_allclose(dataset.relevance.block(image_ids, caption_ids), dense[np.ix_(image_ids, caption_ids)],
                               atol=1e-6)
    # learnable: an image is more relevant to its own captions than to the others
    own = dense[np.arange(200) // 5, np.arange(200)].mean()
    assert own > 2 * dense.mean()


# ------------------------------------------------------------------------------------------------
# np2h


def test_np2h_equal_skip_and_interrupt(synth, tmp_path, monkeypatch, capsys):
    data_path, folder = copy_split(synth, tmp_path)
    argv = ["--data_path", data_path, "--data_name", "f30k_precomp"]
    monkeypatch.setattr(np2h, "BLOCK_BYTES", 7 * 36 * synth.feat_dim * 4)  # several blocks, the last one short

    class Interrupt:  # a progress bar that dies after the first block, like a Ctrl-C mid-file
        def __init__(self, **kwargs):
            pass

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(np2h, "tqdm", Interrupt)
    assert errors.run(np2h.main, argv) == 130
    assert leftovers(folder) == []  # no .h5, no temporary file
    monkeypatch.undo()

    monkeypatch.setattr(np2h, "BLOCK_BYTES", 7 * 36 * synth.feat_dim * 4)
    with h5py.File(folder / "test.h5", "w") as f:  # a stale file of the wrong shape is redone
        f["feat"] = np.zeros((3, 36, synth.feat_dim), np.float32)
    assert errors.run(np2h.main, argv) == 0
    with h5py.File(folder / "test.h5", "r") as f:
        feat = f["feat"]
        assert feat.dtype == np.float32 and feat.chunks == (1, 36, synth.feat_dim)
        np.testing.assert_array_equal(feat[:], np.load(folder / "test_ims.npy"))
    mtime = os.stat(folder / "test.h5").st_mtime_ns
    capsys.readouterr()
    assert errors.run(np2h.main, argv + ["--splits", "test"]) == 0
    assert "skipped" in capsys.readouterr().out and os.stat(folder / "test.h5").st_mtime_ns == mtime
    assert leftovers(folder) == ["test.h5"]


def test_np2h_converts_other_dtypes(tmp_path):
    folder = tmp_path / "d" / "x"
    folder.mkdir(parents=True)
    array = np.arange(2 * 36 * 3, dtype=np.float64).reshape(2, 36, 3)
    np.save(folder / "a_ims.npy", array)
    assert np2h.convert(str(folder / "a_ims.npy"), str(folder / "a.h5"), progress=False)
    with h5py.File(folder / "a.h5", "r") as f:
        np.testing.assert_array_equal(f["feat"][:], array.astype(np.float32))


MEMORY_PROBE = textwrap.dedent("""
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
""")


def peak_rss(*command):
    """Peak resident bytes of `command`, measured by a fresh wrapper process with no other children."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *command], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip())


def test_np2h_memory_does_not_grow_with_file_size(tmp_path):
    folder = tmp_path / "d" / "big"
    folder.mkdir(parents=True)
    features = np.lib.format.open_memmap(folder / "train_ims.npy", mode="w+", dtype=np.float32, shape=(360, 36, 2048))
    features[:] = 1.5  # 106 MB
    features.flush()
    del features
    size = os.path.getsize(folder / "train_ims.npy")
    baseline = peak_rss(sys.executable, "-c", "import np2h")  # interpreter + numpy + h5py + tqdm
    peak = peak_rss(sys.executable, "np2h.py", "--data_path", str(tmp_path / "d"), "--data_name", "big")
    assert peak - baseline < size / 3, (peak, baseline, size)
    with h5py.File(folder / "train.h5", "r") as f:
        assert f["feat"].shape == (360, 36, 2048) and f["feat"][359, 35, 2047] == 1.5


@pytest.mark.parametrize("case", ["text", "ndim", "regions", "truncated", "object", "missing"])
def test_np2h_bad_input(tmp_path, capsys, case):
    folder = tmp_path / "d" / "x"
    folder.mkdir(parents=True)
    path = folder / "train_ims.npy"
    if case == "text":
        path.write_text("not an array\n")
    elif case == "ndim":
        np.save(path, np.zeros((4, 36), np.float32))
    elif case == "regions":
        np.save(path, np.zeros((4, 10, 8), np.float32))
    elif case == "truncated":
        np.save(path, np.zeros((4, 36, 8), np.float32))
        os.truncate(path, os.path.getsize(path) - 16)
    elif case == "object":
        np.save(path, np.array([None] * 4, dtype=object).reshape(4, 1, 1), allow_pickle=True)
    argv = ["--data_path", str(tmp_path / "d"), "--data_name", "x", "--splits", "train"]
    expect_one_line_error(capsys, np2h.main, argv, str(path))
    assert leftovers(folder) == []


def test_np2h_nothing_to_convert(tmp_path, capsys):
    (tmp_path / "d" / "x").mkdir(parents=True)
    expect_one_line_error(capsys, np2h.main, ["--data_path", str(tmp_path / "d"), "--data_name", "x"],
                          str(tmp_path / "d" / "x"))


# ------------------------------------------------------------------------------------------------
# Vocabulary


def test_vocab_round_trip_and_original_format(synth, tmp_path, capsys):
    assert errors.run(vocab_module.main, ["--data_path", synth.data_path, "--data_name", "f30k_precomp",
                                          "--vocab_path", str(tmp_path)]) == 0
    built = vocab_module.deserialize_vocab(str(tmp_path / "f30k_precomp_vocab.json"))
    shipped = load_vocab(synth)
    assert built.word2idx == shipped.word2idx and built.idx2word == shipped.idx2word and len(built) == built.idx
    assert [built.idx2word[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    vocab_module.serialize_vocab(built, str(tmp_path / "again.json"))
    assert filecmp.cmp(tmp_path / "again.json", tmp_path / "f30k_precomp_vocab.json", shallow=False)
    # a file as the original release ships it (compact JSON, string keys in idx2word)
    original = {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4},
                "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"}, "idx": 5}
    (tmp_path / "orig.json").write_text(json.dumps(original))
    orig = vocab_module.deserialize_vocab(str(tmp_path / "orig.json"))
    assert len(orig) == 5 and orig("dog") == 4 and orig("cat") == 3 and orig.idx2word[4] == "dog"
    assert vocab_module.vocab_from_word2idx(original["word2idx"]).word2idx == orig.word2idx


def test_vocab_threshold(tmp_path):
    (tmp_path / "train.txt").write_text("a dog runs.\na dog sits\n")
    (tmp_path / "dev.txt").write_text("A cat runs\n")
    files = [str(tmp_path / "train.txt"), str(tmp_path / "dev.txt")]
    assert list(vocab_module.build_vocab(files, threshold=2).word2idx) == ["<pad>", "<start>", "<end>", "<unk>",
                                                                          "a", "dog", "runs"]
    assert len(vocab_module.build_vocab(files, threshold=1)) == 4 + 6  # a dog runs . sits cat


def test_vocab_bad_input(synth, tmp_path, capsys):
    (tmp_path / "novocab.json").write_text(json.dumps({"idx2word": {}, "idx": 0}))
    with pytest.raises(InputError, match="novocab.json.*word2idx"):
        vocab_module.deserialize_vocab(str(tmp_path / "novocab.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json"):
        vocab_module.deserialize_vocab(str(tmp_path / "broken.json"))
    data_path, folder = copy_split(synth, tmp_path, "train")  # train only: dev is missing
    out = tmp_path / "out"
    expect_one_line_error(capsys, vocab_module.main, ["--data_path", data_path, "--data_name", "f30k_precomp",
                                                      "--vocab_path", str(out)], str(folder / "dev_caps.txt"))
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Bad data files for the loader


def build_dataset(argv):
    data.PrecompDataset(argv[0], "f30k_precomp", "test", vocab=None)


@pytest.mark.parametrize("case,culprit", [
    ("count", "test_ims.npy"), ("shape2d", "test_ims.npy"),
    ("h5_without_feat", "test.h5"), ("h5_not_hdf5", "test.h5"), ("not_array", "test_ims.npy"),
    ("npz", "test_ims.npy"), ("non_utf8", "test_caps.txt"), ("empty", "test_caps.txt"),
    ("blank_line", "test_caps.txt"), ("no_captions", "test_caps.txt"), ("no_features", "test_ims.npy"),
])
def test_loader_bad_input(synth, tmp_path, capsys, case, culprit):
    data_path, folder = copy_split(synth, tmp_path)
    caps, ims = folder / "test_caps.txt", folder / "test_ims.npy"
    if case == "count":
        np.save(ims, np.load(ims)[:39])
    elif case == "shape2d":
        np.save(ims, np.zeros((40, 36), np.float32))
    elif case == "h5_without_feat":
        with h5py.File(folder / "test.h5", "w") as f:
            f["features"] = np.zeros((40, 36, 4), np.float32)
    elif case == "h5_not_hdf5":
        (folder / "test.h5").write_text("hello")
    elif case == "not_array":
        ims.write_text("0 1 2\n")
    elif case == "npz":
        with open(ims, "wb") as f:
            np.savez(f, feat=np.zeros((40, 36, 4), np.float32))
    elif case == "non_utf8":
        caps.write_bytes(b"a dog\n\xff\xfe cat\n")
    elif case == "empty":
        caps.write_text("")
    elif case == "blank_line":
        lines = caps.read_text().split("\n")
        lines[3] = "  "
        caps.write_text("\n".join(lines))
    elif case == "no_captions":
        os.remove(caps)
    elif case == "no_features":
        os.remove(ims)
    expect_one_line_error(capsys, build_dataset, [data_path], str(folder / culprit))


# ------------------------------------------------------------------------------------------------
# Synthetic maker


def test_synthetic_layout_and_annotations(synth):
    ids = [int(line) for line in open(os.path.join(synth.coco_root, "testall_ids.txt"))]
    assert len(ids) == 250 and all(ids[5 * i:5 * i + 5] == [ids[5 * i]] * 5 for i in range(50))
    with open(os.path.join(synth.ann_root, "instances_val2014.json")) as f:
        instances = json.load(f)
    with open(os.path.join(synth.ann_root, "captions_val2014.json")) as f:
        captions = json.load(f)
    assert [im["id"] for im in instances["images"]] == ids[::5] == [im["id"] for im in captions["images"]]
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    assert len(categories) == 80 and set(categories) <= set(range(1, 91)) and categories[1] == "person"
    assert {a["category_id"] for a in instances["annotations"]} <= set(categories)
    assert len({a["image_id"] for a in instances["annotations"]}) == 49  # one image in 50 unannotated
    assert [a["caption"] for a in captions["annotations"]] == data.read_captions(synth.data_path, "coco_precomp", "testall")
    for name, splits in (("f30k_precomp", ("train", "dev", "test")), ("coco_precomp", ("train", "dev", "test", "testall"))):
        for split in splits:
            array = np.load(os.path.join(synth.data_path, name, f"{split}_ims.npy"), mmap_mode="r")
            assert array.dtype == np.float32 and array.shape == (synth.sizes[split], 36, synth.feat_dim)
            assert array.min() >= 0


def test_synthetic_deterministic_and_refuses_bad_sizes(tmp_path, capsys):
    def make(out, *extra):
        argv = ["--tiny", "--out_dir", str(out / "data"), "--vocab_dir", str(out / "vocab"), "--ann_dir", str(out / "ann")]
        return errors.run(make_synthetic_data.main, argv + list(extra))

    assert make(tmp_path / "a") == 0 and make(tmp_path / "b") == 0
    assert make(tmp_path / "c", "--seed", "1", "--rows_per_caption", "test") == 0
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a") for d, _, fs in os.walk(tmp_path / "a") for f in fs
                   if f != make_synthetic_data.MANIFEST)  # the manifests hold modification times
    assert len(files) == 2 * 3 * 2 + 2 + 1 + 2 + 2  # caps+ims per split, testall, ids, 2 annotations, 2 vocabs
    match, mismatch, errs = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert match == files, (mismatch, errs)
    assert not filecmp.cmp(tmp_path / "a" / "data/f30k_precomp/train_caps.txt",
                           tmp_path / "c" / "data/f30k_precomp/train_caps.txt", shallow=False)
    assert np.load(tmp_path / "c" / "data/f30k_precomp/test_ims.npy").shape[0] == 50  # one row per caption
    capsys.readouterr()
    for bad in (["--n_testall", "7"], ["--n_train", "0"], ["--feat_dim", "-1"], ["--rows_per_caption", "val"]):
        argv = ["--out_dir", str(tmp_path / "bad"), "--vocab_dir", str(tmp_path / "bad"), "--ann_dir", str(tmp_path / "bad")]
        expect_one_line_error(capsys, make_synthetic_data.main, argv + bad, bad[0])
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("noise_rate", [0.2, 0.5])
def test_noise_rate_moves_exactly_the_training_captions_of_round_p_n_images(tmp_path, noise_rate):
    """--noise_rate p: round(p x n_train) training images of each dataset get the five captions of another of
    them (no image keeps its own, each source used once); every other file is byte for byte --noise_rate 0's;
    the manifest records p."""
    def make(out, *extra):
        argv = ["--tiny", "--out_dir", str(out / "data"), "--vocab_dir", str(out / "vocab"), "--ann_dir", str(out / "ann")]
        return errors.run(make_synthetic_data.main, argv + list(extra))

    assert make(tmp_path / "clean") == 0 and make(tmp_path / "noisy", "--noise_rate", str(noise_rate)) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "clean") for d, _, fs in os.walk(tmp_path / "clean")
                   for f in fs if f != make_synthetic_data.MANIFEST)
    train_captions = {f"data/{name}/train_caps.txt" for name in ("f30k_precomp", "coco_precomp")}
    match, mismatch, errs = filecmp.cmpfiles(tmp_path / "clean", tmp_path / "noisy", files, shallow=False)
    assert sorted(mismatch) == sorted(train_captions) and not errs and len(match) == len(files) - 2
    n_train = 40  # --tiny
    for path in sorted(train_captions):
        clean = (tmp_path / "clean" / path).read_text(encoding="utf-8").splitlines()
        noisy = (tmp_path / "noisy" / path).read_text(encoding="utf-8").splitlines()
        groups = lambda lines: [tuple(lines[5 * i:5 * i + 5]) for i in range(n_train)]  # noqa: E731
        clean_groups, noisy_groups = groups(clean), groups(noisy)
        assert len(set(clean_groups)) == n_train  # every image's five captions are distinct as a group
        changed = [i for i in range(n_train) if noisy_groups[i] != clean_groups[i]]
        assert len(changed) == round(noise_rate * n_train)
        sources = [clean_groups.index(noisy_groups[i]) for i in changed]  # whose captions each changed image got
        assert sorted(sources) == changed and all(s != i for s, i in zip(sources, changed))
        manifest = json.loads((tmp_path / "noisy" / os.path.dirname(path) / make_synthetic_data.MANIFEST).read_text())
        assert manifest["noise_rate"] == noise_rate
    # the same seed, the same noisy pairs
    assert make(tmp_path / "again", "--noise_rate", str(noise_rate)) == 0
    path = "data/coco_precomp/train_caps.txt"
    assert filecmp.cmp(tmp_path / "noisy" / path, tmp_path / "again" / path, shallow=False)


def test_noise_rate_refuses_bad_values_before_writing(tmp_path, capsys):
    for bad in ("-0.1", "1", "1.5", "nan", "inf", "abc", "0.03"):  # 0.03 x 40 images = 1 noisy image: no partner
        argv = ["--tiny", "--noise_rate", bad, "--out_dir", str(tmp_path / "bad"), "--vocab_dir", str(tmp_path / "bad"),
                "--ann_dir", str(tmp_path / "bad")]
        expect_one_line_error(capsys, make_synthetic_data.main, argv, "noise_rate")
        assert not (tmp_path / "bad").exists()
