"""Convert SCAN region features `{split}_ims.npy` to HDF5 `{split}.h5` (dataset `feat`).

    python np2h.py --data_path data --data_name coco_precomp [--splits train dev]

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

import errors
import fileio
from errors import InputError
from layout import REGIONS

BLOCK_BYTES = 16 << 20  # bytes read per block (about 55 images of 36 x 2048 float32)


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


def main(argv=None):
    parser = errors.ArgumentParser(description="Convert {split}_ims.npy region features to {split}.h5 (dataset 'feat').")
    parser.add_argument("--data_path", default="data", help="folder holding {data_name}/")
    parser.add_argument("--data_name", default="f30k_precomp")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to convert (default: every {split}_ims.npy found)")
    opt = parser.parse_args(argv)
    directory = os.path.join(opt.data_path, opt.data_name)
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: data folder not found")
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
