"""ECCV Caption and CxC metrics (naver-ai/eccv-caption's `eccv_caption` package) of a COCO testall matrix.

The package ships the COCO 5K test ids and the ECCV Caption positives; this adapter maps the rows of a
(5000, 25000) similarity matrix to COCO image ids (testall_ids.txt) and its columns to COCO caption
ids, ranks the top items of every query (topk_rankings: descending score, ties by lower index) and
hands the rankings to the package. `evaluation.py --eccv` calls it.
"""
import os
import warnings

import numpy as np

import data
import fileio
from errors import InputError
from pmrp_com.pmrp import read_image_ids, topk_rankings


def _normalise_caption(text):
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def eccv_caption_ids(captions, image_ids, package_ids, ann_path):
    """COCO caption id of every testall caption line.

    Default: the eccv_caption package's own test-id list (its column order is COCO testall's). With
    captions_val2014.json, each line is matched by text among its image's captions instead (a dozen
    package ids name another caption of the same image). Returns (int64 (n_captions,), how).
    """
    if not os.path.isfile(ann_path):
        return np.asarray(package_ids, dtype=np.int64), "eccv_caption test ids"
    ann = fileio.read_json(ann_path, "COCO captions file")
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise InputError(f"{ann_path}: has no 'annotations' list (not a COCO captions file)")
    by_image = {}
    for a in ann["annotations"]:
        by_image.setdefault(a.get("image_id"), {})[_normalise_caption(str(a.get("caption", "")))] = a.get("id")
    ids = np.asarray(package_ids, dtype=np.int64).copy()
    unmatched = 0
    for j, text in enumerate(captions):
        found = by_image.get(int(image_ids[j // 5]), {}).get(_normalise_caption(text))
        if found is None:
            unmatched += 1  # keep the package's id for this line
        else:
            ids[j] = found
    return ids, f"matched by text in {ann_path} ({unmatched} unmatched lines kept the package's ids)"


def eccv_scores(sims, data_path, data_name, split, ann_root):
    """ECCV Caption mAP@R / R-Precision / R@1 and CxC + COCO 5K R@1/5/10 (percent) of a testall matrix.

    Rows -> COCO image ids from testall_ids.txt; columns -> caption ids (eccv_caption_ids). The
    package's caption->image map must agree with testall_ids.txt on every column.
    """
    with warnings.catch_warnings():  # the package warns when ujson is missing; json is fine
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

    ids_path = os.path.join(data_path, data_name, "testall_ids.txt")
    image_ids = read_image_ids(ids_path, sims.shape[0])
    metrics = Metrics()
    if sims.shape[1] != len(metrics.coco_ids):
        raise InputError(f"--eccv needs the COCO testall split ({len(metrics.coco_ids)} captions); "
                         f"{split} has {sims.shape[1]}")
    captions = data.read_captions(data_path, data_name, split)
    caption_ids, how = eccv_caption_ids(captions, image_ids, metrics.coco_ids,
                                        os.path.join(ann_root, "captions_val2014.json"))
    c2i = metrics.coco_gts["t2i"]
    package_images = np.array([c2i.get(int(c), [-1])[0] for c in caption_ids])
    disagree = np.flatnonzero(package_images != np.repeat(image_ids, 5))
    if len(disagree):
        j = disagree[0]
        raise InputError(f"{ids_path}: image ids disagree with the eccv_caption test split on {len(disagree)} "
                         f"captions (line {j + 1}: {image_ids[j // 5]} vs {package_images[j]})")
    # Every metric reads at most the top max(#positives, 10) items of a ranking.
    k = max(10, max(len(v) for v in metrics.eccv_gts["i2t"].values()),
            max(len(v) for v in metrics.eccv_gts["t2i"].values()))
    i2t_idx, _, t2i_idx, _ = topk_rankings(sims, k)
    i2t_items = {int(image_ids[i]): caption_ids[row].tolist() for i, row in enumerate(i2t_idx)}
    t2i_items = {int(caption_ids[j]): image_ids[row].tolist() for j, row in enumerate(t2i_idx)}
    scores = metrics.compute_all_metrics(
        i2t_items, t2i_items, target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1",
                                              "cxc_recalls", "coco_5k_recalls"), Ks=(1, 5, 10), verbose=False)
    out = {name: {d: 100.0 * float(v) for d, v in value.items()} for name, value in scores.items()}
    out["caption_ids"] = how
    return out
