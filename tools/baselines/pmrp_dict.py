"""PMRP the way PCME's evaluate_pmrp_coco.py computes it: a dict of full rankings per query, walked in Python.

The yardstick for pmrp_com.pmrp (tests) and the speed reference for it (`main`, see below).
As in PCME: the rankings are over the whole split (every query ranks every gallery item); for a fold,
queries outside it are skipped and gallery items whose image is not a fold image with instances are
filtered out of each ranking, order kept. Captions are identified by their column index, images by
their COCO id. Ranking order: descending score, ties by lower index (stable sort).

    python -m tools.baselines.pmrp_dict --path1 S.npy --dataset_root D --ann_root A [--n_fold 5]

times this baseline and pmrp_com.pmrp on the same matrix (annotation reading excluded on both sides),
prints both times, the ratio, and whether the results agree.
"""
import os
import sys
import time

import numpy as np

import errors
from pmrp_com.pmrp import instance_codes, pmrp_scores, read_image_ids


def rankings(sims, image_ids):
    """PCME's ranking dict: {'i2t': {image_id: {'retrieved': [{'image_id', 'id'}...]}},
    't2i': {caption_index: {'query': {'image_id'}, 'retrieved': [{'id': image_id}...]}}}."""
    caption_image = np.repeat(image_ids, 5)
    data = {"i2t": {}, "t2i": {}}
    for i, iid in enumerate(image_ids):
        order = np.argsort(-sims[i], kind="stable")
        data["i2t"][int(iid)] = {"retrieved": [{"image_id": int(caption_image[c]), "id": int(c)} for c in order]}
    for c in range(sims.shape[1]):
        order = np.argsort(-sims[:, c], kind="stable")
        data["t2i"][c] = {"query": {"image_id": int(caption_image[c])},
                          "retrieved": [{"id": int(image_ids[i])} for i in order]}
    return data


def fold_codes(iid_to_code, fold_image_ids):
    """PCME's prepare_data: codes of the fold's images that have instances, pairwise L1 distances."""
    iid_to_cls = {iid: iid_to_code[iid] for iid in fold_image_ids if any(iid_to_code[iid])}
    val_image_ids = list(iid_to_cls)
    codes = np.array([iid_to_cls[i] for i in val_image_ids], dtype=float).reshape(len(val_image_ids), 90)
    pdists = np.zeros((len(codes), len(codes)))
    for idx, code in enumerate(codes):
        pdists[idx] = np.sum(np.abs(codes - code), axis=1)
    return val_image_ids, pdists, {iid: idx for idx, iid in enumerate(val_image_ids)}


def plausible_metrics(data, modal, pdists, iid_to_idx, val_image_ids, max_thres):
    """Per-threshold lists of R-precision and R@1 over the queries (PCME's evaluate_plausible_metrics)."""
    rp_per_thres, r1_per_thres = {}, {}
    for thres in range(max_thres):
        rps, r1s = [], []
        for key, item in data.items():
            iid = key if modal == "image" else item["query"]["image_id"]
            if iid not in val_image_ids:
                continue
            id_key = "image_id" if modal == "image" else "id"
            distance = pdists[iid_to_idx[iid]]
            retrieved = np.array([distance[iid_to_idx[d[id_key]]] for d in item["retrieved"]
                                  if d[id_key] in val_image_ids])
            matched = retrieved <= thres
            R = np.sum(matched)
            rps.append(np.sum(matched[:R]) / R)
            r1s.append(int(matched[0]))
        rp_per_thres[thres], r1_per_thres[thres] = rps, r1s
    return rp_per_thres, r1_per_thres


def pmrp_dict(sims, image_ids, iid_to_code, n_fold=5, max_thres=3):
    """Same output as pmrp_com.pmrp.pmrp_scores, computed PCME's way. iid_to_code: {image_id: 90 ints}."""
    data = rankings(sims, image_ids)
    n = len(image_ids)
    folds = [image_ids[f * n // 5:(f + 1) * n // 5] for f in range(5)] if n_fold else [image_ids]
    out = {"n_fold": n_fold}
    per_fold = {"i2t": [], "t2i": []}
    for fold_ids in folds:
        val_ids, pdists, iid_to_idx = fold_codes(iid_to_code, [int(i) for i in fold_ids])
        val_set = set(val_ids)
        for direction, modal in (("i2t", "image"), ("t2i", "text")):
            rp, r1 = plausible_metrics(data[direction], modal, pdists, iid_to_idx, val_set, max_thres)
            per_fold[direction].append({
                "pmrp": 100 * np.mean([rp[t] for t in range(max_thres)]),
                "pmr1": 100 * np.mean([r1[t] for t in range(max_thres)]),
                "pmrp_thres": {str(t): 100 * np.mean(rp[t]) for t in range(max_thres)}})
    for direction, blocks in per_fold.items():
        out[direction] = {"pmrp": float(np.mean([b["pmrp"] for b in blocks])),
                          "pmr1": float(np.mean([b["pmr1"] for b in blocks])),
                          "pmrp_thres": {t: float(np.mean([b["pmrp_thres"][t] for b in blocks]))
                                         for t in blocks[0]["pmrp_thres"]}}
    return out


def main(argv=None):
    parser = errors.ArgumentParser(description="Time PCME's dict-based PMRP against pmrp_com.pmrp.")
    parser.add_argument("--path1", required=True, help="similarity matrix .npy (n_images, 5 n_images)")
    parser.add_argument("--dataset_root", required=True, help="folder with testall_ids.txt")
    parser.add_argument("--ann_root", default="pmrp_com/coco_ann", help="folder with instances_val2014.json")
    parser.add_argument("--n_fold", type=int, default=5, choices=[0, 5])
    parser.add_argument("--max_thres", type=int, default=3)
    args = parser.parse_args(argv)
    sims = np.load(args.path1)
    ids_path = os.path.join(args.dataset_root, "testall_ids.txt")
    image_ids = read_image_ids(ids_path, sims.shape[0])
    codes = instance_codes(os.path.join(args.ann_root, "instances_val2014.json"), image_ids, ids_path)
    iid_to_code = {int(i): list(map(int, c)) for i, c in zip(image_ids, codes)}

    start = time.perf_counter()
    fast = pmrp_scores(sims, codes, args.n_fold, args.max_thres)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = pmrp_dict(sims, image_ids, iid_to_code, args.n_fold, args.max_thres)
    t_slow = time.perf_counter() - start
    agree = all(np.isclose(fast[d][k], slow[d][k]) for d in ("i2t", "t2i") for k in ("pmrp", "pmr1"))
    print(f"matrix {sims.shape}, n_fold {args.n_fold}: pmrp_com {t_fast:.2f} s, pmrp_dict {t_slow:.2f} s, "
          f"ratio {t_slow / t_fast:.1f}x, results agree: {agree}")
    print(f"pmrp_com: i2t {fast['i2t']['pmrp']:.4f} t2i {fast['t2i']['pmrp']:.4f}; "
          f"pmrp_dict: i2t {slow['i2t']['pmrp']:.4f} t2i {slow['t2i']['pmrp']:.4f}")


if __name__ == "__main__":
    sys.exit(errors.run(main))
