"""The SCAN precomp layout and test protocol every script shares: one definition of each fact.

Region features are (n, REGIONS, D) bottom-up-attention vectors; captions 5i..5i+4 of a split describe
image i; the dev split is cut to its first DEV_MAX_CAPTIONS captions for validation, as SCAN and the
original code do (COCO dev has 25,000); COCO 1K results are the mean over FOLDS folds of the test split.
"""
REGIONS = 36
CAPTIONS_PER_IMAGE = 5
DEV_MAX_CAPTIONS = 5000
FOLDS = 5


def fold_bounds(n_images, n_folds=FOLDS):
    """[(first image, end image)] of the folds: fold f holds images f n / 5 .. (f + 1) n / 5 - 1."""
    return [(f * n_images // n_folds, (f + 1) * n_images // n_folds) for f in range(n_folds)]
