"""Checkpoints in the original SGRAF/DAA format, written atomically, loaded without running pickles.

Format: {'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt'
(argparse.Namespace), 'Eiters'} plus extras of plain types only (optimizer state, RNG state, the
vocabulary's word2idx), so that `torch.load(weights_only=True)` with argparse.Namespace allow-listed
reads both our files and the released ones. State-dict keys are written with DDP's `module.` prefix,
as in the released files, and read with or without it.
"""
import argparse
import os
import warnings

import torch

import opts
from errors import InputError
from fileio import atomic_path

def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically: a kill at any moment leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """Load and check a checkpoint; returns its dict with 'opt' completed by today's defaults."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        # warnings: torch warns about unusual pickle protocols before refusing them; the error says enough
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"{path}: not a loadable checkpoint ({load_failure(err)[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "opt" not in ckpt:
        raise InputError(f"{path}: not a checkpoint of this project (needs 'model' and 'opt' keys)")
    model = ckpt["model"]
    if not (isinstance(model, (list, tuple)) and len(model) == 3 and all(isinstance(m, dict) for m in model)):
        raise InputError(f"{path}: 'model' must be a list of three state dicts [img_enc, txt_enc, sim_enc]")
    if not isinstance(ckpt["opt"], argparse.Namespace):
        raise InputError(f"{path}: 'opt' is not an argparse.Namespace")
    opts.with_defaults(ckpt["opt"])
    return ckpt


def load_failure(err):
    """The useful line of torch.load's exception. For a weights_only refusal, what was refused: torch's
    advice to retry with weights_only=False is wrong here, that would run the file's code."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        boilerplate = ("Please file an issue", "Check the documentation")
        details = [line for line in lines[1:] if not line.startswith(boilerplate)]
        return "holds objects other than tensors and plain types, not loaded: " + (details[0] if details else "")
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_vocab(ckpt, path, vocab, vocab_path):
    """InputError unless `vocab` (read from `vocab_path`) is the one checkpoint `path` was trained with.

    The text encoder's embedding needs one row per word; and where the checkpoint stores its word2idx
    (ours do), every word must keep its id: a vocabulary rebuilt from other files or in another order can
    have the same size and would silently send every caption through the wrong embeddings.
    """
    text_encoder = ckpt["model"][1]
    embed = text_encoder.get("module.embed.weight", text_encoder.get("embed.weight"))  # with or without DDP's prefix
    if embed is not None and embed.shape[0] != len(vocab):
        raise InputError(f"{vocab_path}: {len(vocab)} words, but the embedding of {path} has {embed.shape[0]} "
                         f"rows (not the vocabulary it was trained with)")
    stored = ckpt.get("vocab")
    if isinstance(stored, dict) and stored != vocab.word2idx:
        changed = sorted(w for w in stored.keys() | vocab.word2idx.keys() if stored.get(w) != vocab.word2idx.get(w))
        raise InputError(f"{vocab_path}: {len(changed)} words have other ids than in the vocabulary stored in "
                         f"{path} (e.g. {changed[0]!r}); not the vocabulary it was trained with")


def add_module_prefix(state_dict):
    """Every key with DDP's leading 'module.', as the original's checkpoints have them (code written for
    the original loads them as they are)."""
    return {"module." + key: value for key, value in state_dict.items()}
