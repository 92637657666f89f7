"""PMRP (plausible-match R-precision, PCME) of saved COCO similarity matrices.

    python pmrp_evaluation.py --path1 S.npy [--path2 S2.npy] --n_fold 5|0 [--dataset_root D]
                              [--ann_root pmrp_com/coco_ann] [--max_thres 3] [--json OUT]

S.npy is an (n_images, 5 n_images) matrix ((5000, 25000) for COCO testall), e.g. from
`evaluation.py --save_sims`; with --path2 the two are averaged (SGRAF). The COCO image id of each row
comes from {dataset_root}/testall_ids.txt (one id per caption line), the images' category codes from
{ann_root}/instances_val2014.json. --n_fold 5: mean over the five 1K folds; --n_fold 0: the whole split.
The algorithm and its exact conventions are described in pmrp_com/pmrp.py.
"""
import os
import sys

import errors
import fileio
from pmrp_com.pmrp import instance_codes, pmrp_scores, read_image_ids


def build_parser():
    p = errors.ArgumentParser(description="PMRP of saved similarity matrices on COCO (PCME's metric).")
    p.add_argument("--path1", required=True, help="similarity matrix .npy, (n_images, 5 n_images)")
    p.add_argument("--path2", default=None, help="second matrix, averaged with the first (SGRAF)")
    p.add_argument("--n_fold", type=int, required=True, choices=[0, 5], help="5: mean of the 1K folds; 0: whole split")
    p.add_argument("--dataset_root", default=os.path.join("data", "coco_precomp"), help="folder with testall_ids.txt")
    p.add_argument("--ann_root", default=os.path.join("pmrp_com", "coco_ann"),
                   help="folder with instances_val2014.json")
    p.add_argument("--max_thres", type=int, default=3, help="thresholds 0..max_thres-1 on the L1 code distance")
    p.add_argument("--json", default=None, help="write the results (and provenance) to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_thres < 1:
        raise errors.InputError(f"--max_thres must be at least 1, got {args.max_thres}")
    if args.json:
        fileio.check_output(args.json)
    paths = [args.path1] + ([args.path2] if args.path2 else [])
    sims = fileio.load_sims(paths)
    ids_path = os.path.join(args.dataset_root, "testall_ids.txt")
    image_ids = read_image_ids(ids_path, sims.shape[0])
    codes = instance_codes(os.path.join(args.ann_root, "instances_val2014.json"), image_ids, ids_path)
    dropped = int((~codes.any(1)).sum())
    result = pmrp_scores(sims, codes, args.n_fold, args.max_thres)
    scope = "mean of 5 folds" if args.n_fold else "whole split"
    print(f"PMRP ({scope}, {sims.shape[0]} images, {dropped} without instances dropped)")
    for d, name in (("i2t", "image-to-text"), ("t2i", "text-to-image")):
        r = result[d]
        thres = "  ".join(f"<={t}: {v:.2f}" for t, v in r["pmrp_thres"].items())
        print(f"{name} PMRP: {r['pmrp']:.2f}  PM-R@1: {r['pmr1']:.2f}  ({thres})")
    if args.json:
        result["provenance"] = fileio.provenance(argv, sims=paths, dataset_root=args.dataset_root, ann_root=args.ann_root,
                                          max_thres=args.max_thres, images_without_instances=dropped)
        fileio.write_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(errors.run(main))
