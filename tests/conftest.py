"""Shared fixtures: one tiny synthetic dataset for the whole test session.

Tests import the project's top-level scripts (`import data`, `import vocab`, ...) from the repository
root, which pytest puts on sys.path through this file's parent (`rootdir`); the line below makes that
explicit for runs started from elsewhere.
"""
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SYNTH_SIZES = {"n_train": 200, "n_dev": 40, "n_test": 40, "n_testall": 50}
SYNTH_FEAT_DIM = 64
SYNTH_SEED = 0


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A tiny synthetic copy of both datasets, written once per session by make_synthetic_data.main.

    Do not modify its files (copy them first); fields of the returned SimpleNamespace:
      root        the temporary folder holding everything below
      data_path   data folder: data_path/f30k_precomp/{train,dev,test}_{caps.txt,ims.npy} and
                  data_path/coco_precomp/{train,dev,test,testall}_{caps.txt,ims.npy} + testall_ids.txt
      vocab_path  folder with f30k_precomp_vocab.json and coco_precomp_vocab.json
      ann_root    folder with COCO-format captions_val2014.json and instances_val2014.json (testall images;
                  one testall image in 50 has no instance annotation, as in real COCO)
      coco_root   data_path/coco_precomp (PMRP's --dataset_root)
      feat_dim    region feature dimension D (64); images are (36, D) float32
      sizes       {"train": 200, "dev": 40, "test": 40, "testall": 50} images per split (5 captions each;
                  the same for f30k_precomp, which has no testall); testall = 5 folds of 10 images
      seed        the generator seed (0)
      argv        the make_synthetic_data argument list used (re-run it with another --out_dir to get a
                  byte-identical copy)
    """
    import make_synthetic_data

    root = tmp_path_factory.mktemp("synth")
    data_path, vocab_path, ann_root = str(root / "data"), str(root / "vocab"), str(root / "coco_ann")
    argv = ["--out_dir", data_path, "--vocab_dir", vocab_path, "--ann_dir", ann_root, "--seed", str(SYNTH_SEED),
            "--feat_dim", str(SYNTH_FEAT_DIM)]
    for name, value in SYNTH_SIZES.items():
        argv += [f"--{name}", str(value)]
    make_synthetic_data.main(argv)
    return types.SimpleNamespace(
        root=str(root), data_path=data_path, vocab_path=vocab_path, ann_root=ann_root,
        coco_root=os.path.join(data_path, "coco_precomp"), feat_dim=SYNTH_FEAT_DIM, seed=SYNTH_SEED,
        sizes={k[2:]: v for k, v in SYNTH_SIZES.items()}, argv=argv)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests, restored afterwards (float sums depend on it)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
