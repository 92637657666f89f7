"""tools.noise_diagnosis: which images the noise moved (read from the caption files) and the fit measures,
against hand-built cases."""
import os

import numpy as np

from tools import noise_diagnosis


def write_captions(root, blocks):
    folder = root / "coco_precomp"
    folder.mkdir(parents=True)
    (folder / "train_caps.txt").write_text("".join(line + "\n" for block in blocks for line in block), encoding="utf-8")
    return str(root)


def test_noise_is_read_from_the_two_caption_files(tmp_path):
    clean = [[f"image {k} caption {c}" for c in range(5)] for k in range(6)]
    noisy = [clean[0], clean[3], clean[2], clean[5], clean[4], clean[1]]  # images 1, 3, 5 hold 3's, 5's, 1's
    changed, holder = noise_diagnosis.noise_of(write_captions(tmp_path / "clean", clean),
                                               write_captions(tmp_path / "noisy", noisy))
    # image 1's own captions went to image 5, image 3's to image 1, image 5's to image 3
    assert changed.tolist() == [1, 3, 5] and holder.tolist() == [5, 1, 3]


def test_fit_measures_count_fitted_noise_and_kept_truth():
    n = 4  # images 0, 1 clean; images 2 and 3 swapped their captions (2 holds 3's, 3 holds 2's)
    noisy, holder = np.array([2, 3]), np.array([3, 2])
    sims = np.zeros((n, 5 * n))
    sims[0, 0:5] = 1.0  # clean image 0: its own captions first
    sims[1, 0:5] = 1.0  # clean image 1: image 0's captions first (a miss)
    sims[2, 10:15] = 1.0  # noisy image 2: the captions it was given (fitted noise)
    sims[3, 10:15] = 1.0  # noisy image 3: image 2's captions, i.e. its own true ones (kept truth)
    sims[:, 5:10] += 0.5 * np.eye(n)[:, [1]]  # caption columns of image 1: image 1 scores them 0.5, others 0
    measures = noise_diagnosis.fit_measures(sims, noisy, holder)
    assert measures["i2t"] == {"clean_r1": 50.0, "noise_fitted": 50.0, "truth_kept": 50.0}
    # t2i: captions 0-4 -> image 0 (argmax of the tied 1, 1 column: the first, image 0): own, clean;
    # captions 5-9 -> image 1 (0.5): own, clean; captions 10-14 (held by 2, describing 3) -> image 2
    # (tie of 2 and 3 -> first, 2): fitted noise; captions 15-19 (held by 3, describing 2) -> all 0 -> image 0
    assert measures["t2i"] == {"clean_r1": 100.0, "noise_fitted": 50.0, "truth_kept": 0.0}
