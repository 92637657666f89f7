"""Convert SCAN region features `{split}_ims.npy` to HDF5 `{split}.h5` (dataset `feat`), or check a prepared dataset.

    python np2h.py --data_path data --data_name coco_precomp [--splits train dev]
    python np2h.py --check --data_path data --data_name coco_precomp [--vocab_path vocab/] [--ann_root A]
                   [--any_counts] [--img_dim 2048]

--check reads what training and evaluation will read (headers and two images per split, never a whole
split) and prints one line per problem, each naming its file, then exits with 2; a dataset without
problems gets one summary line and exit 0. It checks every split's caption file and features (present,
readable, 36 regions of --img_dim values, 5 captions per image, one feature row per image or per
caption, an .h5 that matches its .npy), the image and caption counts against the published ones of
f30k_precomp and coco_precomp (--any_counts accepts the dataset's own, e.g. synthetic data), the
vocabulary, and for COCO testall_ids.txt and the annotation file PMRP reads.

Why: a data loader worker reading an .npy through a memory map keeps every page it touched resident
(COCO train is 113,287 x 36 x 2048 float32 = 33 GB), while HDF5 reads one image at a time into a small
buffer. The conversion itself streams blocks of images with plain file reads from the .npy header's
offset, so its memory stays bounded by one block whatever the file size (a long-lived memmap would
again count every page read in the process's resident memory). `feat` is float32, chunked one image
(1, 36, D) per chunk, so reading image i touches exactly one chunk.

Each file is written under a temporary name and renamed when complete: an `.h5` that exists is finished,
and re-running skips it (unless its `feat` no longer matches the .npy's shape).
"""
import glob
import os
import sys

import h5py
import numpy as np
from tqdm import tqdm

import data
import errors
import fileio
import vocab as vocab_lib
from errors import InputError
from layout import CAPTIONS_PER_IMAGE, REGIONS, dataset_dir
from pmrp_com.pmrp import instance_codes, read_image_ids

BLOCK_BYTES = 16 << 20  # bytes read per block (about 55 images of 36 x 2048 float32)
# (images, captions) of every split of the SCAN releases (Karpathy's splits), as users download them:
# SCAN's README and data.py, and the counts its users report (COCO `test` is the 1K subset; COCO 1K and
# 5K results come from `testall`). Feature files hold one row per image, or one per caption.
PUBLISHED_COUNTS = {
    "f30k_precomp": {"train": (29000, 145000), "dev": (1014, 5070), "test": (1000, 5000)},
    "coco_precomp": {"train": (113287, 566435), "dev": (5000, 25000), "test": (1000, 5000),
                     "testall": (5000, 25000)},
}
PMRP_SPLIT = "testall"  # the COCO split whose image ids (testall_ids.txt) and annotations PMRP reads


def read_npy_header(path):
    """(shape, dtype, data_offset) of an .npy file, checked to hold an (n, 36, D) numeric C-order array."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: feature file not found")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as err:
            raise InputError(f"{path}: not a .npy array file ({err})") from None
        offset = f.tell()
    if dtype.kind not in "fiu":
        raise InputError(f"{path}: features must be numbers, found dtype {dtype}")
    if fortran_order:
        raise InputError(f"{path}: Fortran-ordered arrays are not supported (save it with np.save of a C-order array)")
    if len(shape) != 3 or shape[1] != REGIONS or shape[0] < 1 or shape[2] < 1:
        raise InputError(f"{path}: expected region features of shape (n, {REGIONS}, D), found {tuple(shape)}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise InputError(f"{path}: file is {os.path.getsize(path)} bytes but its header {tuple(shape)} {dtype} "
                         f"needs {expected} (truncated?)")
    return tuple(shape), dtype, offset


def is_finished(h5_path, shape):
    """True if `h5_path` holds a float32 `feat` of `shape` (only a completed conversion is ever renamed there)."""
    if not os.path.isfile(h5_path):
        return False
    try:
        with h5py.File(h5_path, "r") as f:
            feat = f.get("feat")
            return isinstance(feat, h5py.Dataset) and feat.shape == shape and feat.dtype == np.float32
    except OSError:
        return False


def convert(npy_path, h5_path, progress=True):
    """Stream `npy_path` into `h5_path`; returns False if `h5_path` was already finished (skipped)."""
    shape, dtype, offset = read_npy_header(npy_path)
    if is_finished(h5_path, shape):
        return False
    n, _, dim = shape
    per_image = REGIONS * dim * dtype.itemsize
    block_images = max(1, BLOCK_BYTES // per_image)
    buffer = np.empty((block_images, REGIONS, dim), dtype=dtype)
    with fileio.atomic_path(h5_path) as tmp, open(npy_path, "rb") as src:
        src.seek(offset)
        with h5py.File(tmp, "w") as dst:
            feat = dst.create_dataset("feat", shape=shape, dtype=np.float32, chunks=(1, REGIONS, dim))
            bar = tqdm(total=n, unit="img", desc=os.path.basename(h5_path), disable=not progress)
            for start in range(0, n, block_images):
                stop = min(n, start + block_images)
                block = buffer[:stop - start]
                if src.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise InputError(f"{npy_path}: file ended early at image {start}")
                feat[start:stop] = block if dtype == np.float32 else block.astype(np.float32)
                bar.update(stop - start)
            bar.close()
    return True


# ------------------------------------------------------------------------------------------------
# --check


def check_split(directory, split, img_dim, published):
    """Problems of one split (a list of one-line strings, each naming its file) and its (images, captions,
    feature file) when its captions and features could be read (else None).

    published: (images, captions) the split must have, or None to accept its own counts.
    """
    problems = []
    caps_path = os.path.join(directory, f"{split}_caps.txt")
    try:
        n_captions = len(fileio.read_lines(caps_path, "caption file"))
        features = data.FeatureStore(directory, split, n_captions)
    except InputError as err:  # a missing or unreadable file, feature rows that fit no caption count
        return [str(err)], None
    if n_captions % CAPTIONS_PER_IMAGE:
        problems.append(f"{caps_path}: {n_captions} captions, not {CAPTIONS_PER_IMAGE} per image")
    if (features.n_regions, features.img_dim) != (REGIONS, img_dim):
        problems.append(f"{features.path}: {features.n_regions} regions of {features.img_dim} values per image, "
                        f"expected {REGIONS} of {img_dim} (--img_dim)")
    npy_path = os.path.join(directory, f"{split}_ims.npy")
    if features.kind == "h5" and os.path.isfile(npy_path):  # the loader reads the .h5: it must be the .npy's
        try:
            shape = read_npy_header(npy_path)[0]
            if not is_finished(features.path, shape):
                problems.append(f"{features.path}: does not hold the float32 {shape} features of {npy_path} "
                                f"(delete it and run np2h.py again)")
        except InputError as err:
            problems.append(str(err))
    try:  # the first and the last image: a file cut short or filled with garbage shows there
        for index in sorted({0, features.n_images - 1}):
            if not np.isfinite(features[index]).all():
                problems.append(f"{features.path}: image {index} has NaN or inf values")
    except (OSError, ValueError) as err:
        problems.append(f"{features.path}: features cannot be read ({str(err)[:120]})")
    finally:
        features.close()
    counts = (features.n_images, n_captions)
    if published is not None and counts != published:
        problems.append(f"{caps_path}: {counts[0]:,} images / {counts[1]:,} captions, the published {split} split has "
                        f"{published[0]:,} / {published[1]:,} (--any_counts accepts other counts)")
    return problems, (features.n_images, n_captions, features.kind)


def check_pmrp(directory, n_images, ann_root):
    """Problems of testall_ids.txt (one COCO image id per testall caption) and of the COCO instances file
    PMRP reads for those ids; and the number of images without instances (None when unchecked)."""
    ids_path = os.path.join(directory, "testall_ids.txt")
    try:
        image_ids = read_image_ids(ids_path, n_images, os.path.join(directory, f"{PMRP_SPLIT}_caps.txt"))
        codes = instance_codes(os.path.join(ann_root, "instances_val2014.json"), image_ids, ids_path)
    except InputError as err:
        return [str(err)], None
    return [], int((~codes.any(1)).sum())


def check_dataset(opt):
    """Every problem of the dataset `opt` names (list of lines) and, when there is none, its summary line."""
    directory = dataset_dir(opt.data_path, opt.data_name)
    published = PUBLISHED_COUNTS.get(opt.data_name, {})
    splits = opt.splits or list(published) or sorted(
        os.path.basename(p)[:-len("_caps.txt")] for p in glob.glob(os.path.join(directory, "*_caps.txt")))
    if not splits:
        return [f"{directory}: no {{split}}_caps.txt caption files"], None
    problems, found = [], {}
    for split in splits:
        split_problems, counts = check_split(directory, split, opt.img_dim,
                                             None if opt.any_counts else published.get(split))
        problems += split_problems
        if counts is not None:
            found[split] = counts
    vocab_path = os.path.join(opt.vocab_path, f"{opt.data_name}_vocab.json")
    try:
        n_words = len(vocab_lib.deserialize_vocab(vocab_path))
    except InputError as err:
        problems.append(str(err))
    no_instances = None
    if PMRP_SPLIT in splits:
        if PMRP_SPLIT in found:
            pmrp_problems, no_instances = check_pmrp(directory, found[PMRP_SPLIT][0], opt.ann_root)
            problems += pmrp_problems
        elif not os.path.isfile(os.path.join(directory, "testall_ids.txt")):
            problems.append(f"{os.path.join(directory, 'testall_ids.txt')}: image id list not found (PMRP)")
    if problems:
        return problems, None
    parts = [f"{split} {n:,} images / {c:,} captions ({kind})" for split, (n, c, kind) in found.items()]
    pmrp = "" if no_instances is None else (f"; PMRP annotations {opt.ann_root} (testall images without instances: "
                                            f"{no_instances})")
    counts = "counts as found (--any_counts)" if opt.any_counts or not published else "counts as published"
    return [], (f"{directory}: ready: {', '.join(parts)}; features ({REGIONS}, {opt.img_dim}); {counts}; "
                f"vocabulary {vocab_path} ({n_words:,} words){pmrp}")


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = errors.ArgumentParser(description="Convert {split}_ims.npy region features to {split}.h5 (dataset "
                                               "'feat'), or --check a prepared dataset.")
    parser.add_argument("--data_path", default="data", help="folder holding {data_name}/")
    parser.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp, or any folder name")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to convert (default: every {split}_ims.npy found) or to check (default: the "
                             "published splits of f30k_precomp / coco_precomp, else every {split}_caps.txt)")
    parser.add_argument("--check", action="store_true",
                        help="convert nothing: check the dataset (one line per problem and exit 2, or a summary line)")
    parser.add_argument("--vocab_path", default="vocab/", help="--check: folder holding {data_name}_vocab.json")
    parser.add_argument("--ann_root", default=os.path.join("pmrp_com", "coco_ann"),
                        help="--check: folder with instances_val2014.json (COCO, for PMRP)")
    parser.add_argument("--img_dim", default=2048, type=int, help="--check: region feature dimension expected")
    parser.add_argument("--any_counts", action="store_true",
                        help="--check: accept the dataset's own image and caption counts instead of the published "
                             "ones (synthetic or custom data)")
    opt = parser.parse_args(argv)
    if opt.check:
        problems, summary = check_dataset(opt)
        for line in problems:
            print(line)
        if problems:
            raise SystemExit(2)
        print(summary)
        return
    directory = dataset_dir(opt.data_path, opt.data_name)
    if opt.splits is None:
        splits = sorted(os.path.basename(p)[:-len("_ims.npy")] for p in glob.glob(os.path.join(directory, "*_ims.npy")))
        if not splits:
            raise InputError(f"{directory}: no *_ims.npy feature files found")
    else:
        splits = opt.splits
    npy_paths = [os.path.join(directory, f"{split}_ims.npy") for split in splits]
    for path in npy_paths:  # check every input before spending minutes on the first one
        read_npy_header(path)
    for split, npy_path in zip(splits, npy_paths):
        h5_path = os.path.join(directory, f"{split}.h5")
        if convert(npy_path, h5_path):
            print(f"{h5_path}: written")
        else:
            print(f"{h5_path}: already converted, skipped")


if __name__ == "__main__":
    sys.exit(errors.run(main))
