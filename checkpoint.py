"""Checkpoints in the original SGRAF/DAA format, written atomically, loaded without running pickles.

Format: {'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt'
(argparse.Namespace), 'Eiters'} plus extras of plain types only (optimizer state, RNG state, the
vocabulary's word2idx), so that `torch.load(weights_only=True)` with argparse.Namespace allow-listed
reads both our files and the released ones. Keys may carry DDP's `module.` prefix.
"""
import argparse
import os
import time

import torch

import opts
from errors import InputError
from fileio import atomic_path

# Test-only hook: seconds to pause after writing the temporary file and before the rename, so that a
# kill drill can land in the middle of a checkpoint write on purpose.
SLOW_WRITE_ENV = "DAA_SLOW_CHECKPOINT_WRITE"


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically: a kill at any moment leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if os.environ.get(SLOW_WRITE_ENV):
            time.sleep(float(os.environ[SLOW_WRITE_ENV]))


def load_checkpoint(path):
    """Load and check a checkpoint; returns its dict with 'opt' completed by today's defaults."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a loadable checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "opt" not in ckpt:
        raise InputError(f"{path}: not a checkpoint of this project (needs 'model' and 'opt' keys)")
    model = ckpt["model"]
    if not (isinstance(model, (list, tuple)) and len(model) == 3 and all(isinstance(m, dict) for m in model)):
        raise InputError(f"{path}: 'model' must be a list of three state dicts [img_enc, txt_enc, sim_enc]")
    if not isinstance(ckpt["opt"], argparse.Namespace):
        raise InputError(f"{path}: 'opt' is not an argparse.Namespace")
    opts.with_defaults(ckpt["opt"])
    return ckpt


def strip_module_prefix(state_dict):
    """Drop DDP's leading 'module.' from every key."""
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}


def load_weights(model, state_dicts, path):
    """Load [img, txt, sim] state dicts into a SimilarityModel, naming `path` in any mismatch."""
    try:
        model.load_state_dicts(state_dicts)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise InputError(f"{path}: weights do not fit the model ({detail[:300]})") from None


def model_from_checkpoint(ckpt, path, vocab_size=None):
    """Build the checkpoint's model (its options; `vocab_size` defaults to the embedding's rows) in eval mode."""
    from model import SimilarityModel

    opt = argparse.Namespace(**vars(ckpt["opt"]))
    embed = strip_module_prefix(ckpt["model"][1]).get("embed.weight")
    if embed is None:
        raise InputError(f"{path}: text encoder has no 'embed.weight'")
    if vocab_size is not None and vocab_size != embed.shape[0]:
        raise InputError(f"{path}: vocabulary has {vocab_size} words but the checkpoint's embedding has "
                         f"{embed.shape[0]} rows (wrong --vocab_path?)")
    opt.vocab_size = embed.shape[0]
    model = SimilarityModel(opt)
    load_weights(model, ckpt["model"], path)
    return model.eval()
