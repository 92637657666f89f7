"""The SCAN precomp layout and test protocol every script shares: one definition of each fact.

Region features are (n, REGIONS, D) bottom-up-attention vectors; captions 5i..5i+4 of a split describe
image i; the dev split is cut to its first DEV_MAX_CAPTIONS captions for validation, as SCAN and the
original code do (COCO dev has 25,000); COCO 1K results are the mean over FOLDS folds of the test split.
A dataset is the folder `{data_path}/{data_name}/`.
"""
import difflib
import os

from errors import InputError

REGIONS = 36
CAPTIONS_PER_IMAGE = 5
DEV_MAX_CAPTIONS = 5000
FOLDS = 5


def fold_bounds(n_images, n_folds=FOLDS):
    """[(first image, end image)] of the folds: fold f holds images f n / 5 .. (f + 1) n / 5 - 1."""
    return [(f * n_images // n_folds, (f + 1) * n_images // n_folds) for f in range(n_folds)]


def dataset_dir(data_path, data_name):
    """`{data_path}/{data_name}`, or an InputError that says what was probably meant.

    Two slips are common: a short name (`--data_name coco` for the folder coco_precomp) and the dataset
    folder given as --data_path as well (`--data_path data/coco_precomp --data_name coco_precomp`).
    """
    directory = os.path.join(data_path, data_name)
    if os.path.isdir(directory):
        return directory
    if not os.path.isdir(data_path):
        raise InputError(f"{data_path}: data folder not found (--data_path)")
    parent, last = os.path.split(os.path.normpath(data_path))
    if last == data_name:
        raise InputError(f"{directory}: not found; --data_path already ends in {data_name}: "
                         f"give --data_path {parent or '.'} --data_name {data_name}")
    folders = sorted(d for d in os.listdir(data_path) if os.path.isdir(os.path.join(data_path, d)))
    close = [d for d in folders if d.startswith(data_name)] or difflib.get_close_matches(data_name, folders, n=1)
    if close:
        raise InputError(f"{directory}: dataset folder not found; did you mean --data_name {close[0]}?")
    raise InputError(f"{directory}: dataset folder not found (folders in {data_path}: "
                     f"{', '.join(folders[:10]) or 'none'})")
