"""PMRP (plausible-match R-precision, PCME, Chun et al. CVPR 2021) for COCO similarity matrices.

`pmrp.py` holds the vectorised algorithm; `coco_ann/` is the default folder for the COCO 2014 val
annotation files (see coco_ann/README.md). The command line is pmrp_evaluation.py.
"""
from pmrp_com.pmrp import instance_codes, plausibility_distances, pmrp_scores, read_image_ids

__all__ = ["instance_codes", "plausibility_distances", "pmrp_scores", "read_image_ids"]
