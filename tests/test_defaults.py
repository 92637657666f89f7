"""Every default and constant of the original, asserted once: the options, the model's and the data's.

A re-implementation goes wrong most quietly here: a changed default or constant still trains, evaluates
and passes every test that builds its own options. The values below are the original SGRAF/DAA
release's (its opts.py, model.py, data.py and vocab.py), written out, not read from the project.
"""
import argparse
import math

import numpy as np
import pytest
import torch

import daa_loss
import data
import evaluation
import model
import opts
import vocab as vocab_module
from tools.baselines.tfidf_dense import relevance_dense
from errors import InputError

# The original opts.py: every option with a number or name of the method, and its default. world_size
# is 1 instead of the original's 4, which assumed four GPUs (assets/differences.md).
ORIGINAL_DEFAULTS = {
    "data_path": "data", "data_name": "f30k_precomp", "vocab_path": "vocab/", "batch_size": 128,
    "num_epochs": 30, "lr_update": 20, "learning_rate": 0.00015, "log_step": 10, "grad_clip": 2.0,
    "margin": 0.2, "max_violation": True, "world_size": 1, "img_dim": 2048, "word_dim": 300,
    "embed_size": 1024, "sim_dim": 256, "num_layers": 1, "bi_gru": True, "no_imgnorm": False,
    "no_txtnorm": False, "module_name": "SGR", "sgr_step": 3, "daa_weight": 25,
}
# Options of the original whose defaults are paths or machine settings.
ORIGINAL_NAMES = {"model_name", "logger_name", "workers", "val_step", "local_rank"}
# What the project adds; each default keeps the original's behaviour.
ADDED_DEFAULTS = {"warmup_epochs": 0, "accum_steps": 1, "amp": "none", "daa_variant": "reference",
                  "daa_temp": 0.001, "val_images": 0, "resume": "", "init_from": ""}


def tiny_model(module_name="SAF"):
    opt = argparse.Namespace(img_dim=8, word_dim=4, embed_size=8, sim_dim=4, num_layers=1, bi_gru=True,
                             no_imgnorm=False, no_txtnorm=False, module_name=module_name, sgr_step=3, vocab_size=10)
    return model.SimilarityModel(opt)


def sigma(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# Options


def test_options_parsed_without_arguments_are_the_originals():
    opt = vars(opts.parse_opt([]))
    assert {k: opt[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    assert {k: opt[k] for k in ADDED_DEFAULTS} == ADDED_DEFAULTS
    assert ORIGINAL_NAMES <= set(opt)
    assert isinstance(opt["learning_rate"], float) and isinstance(opt["daa_weight"], float)


def test_original_store_false_switches_turn_their_feature_off():
    for flag, dest in (("--max_violation", "max_violation"), ("--no_max_violation", "max_violation"),
                       ("--bi_gru", "bi_gru"), ("--no_bi_gru", "bi_gru")):
        assert getattr(opts.parse_opt([flag]), dest) is False, flag


def test_loss_defaults():
    """DAALoss() and asp_soft's defaults: margin 0.2, max-violation, weight 25, reference indexing, tau 0.001."""
    loss = daa_loss.DAALoss()
    assert (loss.margin, loss.max_violation, loss.daa_weight, loss.daa_temp, loss.daa_variant) == \
        (0.2, True, 25, 0.001, "reference")
    # asp_soft's temperature: score gaps of 0.01 and 0.02 are 10 and 20 units of tau = 0.001
    s, m = [0.30, 0.31, 0.29], [0.0, 1.0, 2.0]
    rank_s = [1 + sum(sigma((s[a] - s[c]) / 0.001) for a in range(3) if a != c) for c in range(3)]
    rank_m = [3.0, 2.0, 1.0]
    expected = np.mean([min(x, y) / max(x, y) for x, y in zip(rank_s, rank_m)])
    got = daa_loss.asp_soft(torch.tensor([s], dtype=torch.float64), torch.tensor([m], dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Model constants


def test_scan_attention_lambda_is_9_and_is_the_one_used(monkeypatch):
    assert model.SMOOTH == 9.0
    torch.manual_seed(0)
    net = tiny_model().eval()
    images, captions, lengths = torch.rand(3, 36, 8), torch.randint(4, 10, (2, 5)), torch.tensor([5, 3])
    with torch.no_grad():
        at_9 = net(images, captions, lengths)
        monkeypatch.setattr(model, "SMOOTH", 4.0)
        at_4 = net(images, captions, lengths)
    assert (at_9 - at_4).abs().max() > 1e-4


def test_dropout_is_0_4_in_all_five_places():
    dropouts = {name: m.p for name, m in tiny_model().named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts == {"txt_enc.dropout": 0.4,
                        "sim_enc.v_global_w.embedding_local.3": 0.4, "sim_enc.v_global_w.embedding_global.3": 0.4,
                        "sim_enc.t_global_w.embedding_local.2": 0.4, "sim_enc.t_global_w.embedding_global.2": 0.4}


def test_36_regions(tmp_path):
    """VisualSA's BatchNorm has one channel per region: features with 35 or 37 regions are refused."""
    assert tiny_model().sim_enc.v_global_w.embedding_local[1].num_features == 36
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "test_caps.txt").write_text("a dog\n" * 10)
    for regions in (36, 35, 37):
        np.save(tmp_path / "x" / "test_ims.npy", np.zeros((2, regions, 8), np.float32))
        features = data.FeatureStore(str(tmp_path / "x"), "test", 10)
        if regions == 36:
            data.check_features(features, 8, "a model with --img_dim 8")
        else:
            with pytest.raises(InputError, match="needs 36 regions"):
                data.check_features(features, 8, "a model with --img_dim 8")


# ------------------------------------------------------------------------------------------------
# Data constants


def test_dev_is_cut_to_5000_captions_for_training_and_evaluation(tmp_path):
    """A dev split of 1,001 images: validation and evaluation.py both see the first 1,000 (5,000 captions),
    TF-IDF fit on those; other splits are not cut."""
    folder = tmp_path / "toy_precomp"
    folder.mkdir()
    lines = [f"caption of image{j // 5 % 13} with word{j % 7}" for j in range(5005)]
    lines[-5:] = ["image image image word1"] * 5  # the cut-off image changes the idf if it is fitted on
    for split in ("dev", "test"):
        (folder / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
        np.save(folder / f"{split}_ims.npy", np.zeros((1001, 36, 1), np.float32))
    vocab = vocab_module.vocab_from_word2idx({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3})
    dev = data.PrecompDataset(str(tmp_path), "toy_precomp", "dev", vocab)
    assert (dev.n_captions, dev.n_images) == (5000, 1000)
    assert data.PrecompDataset(str(tmp_path), "toy_precomp", "test", vocab).n_captions == 5005
    relevance, _ = evaluation.relevance_of_split(str(tmp_path), "toy_precomp", "dev")
    assert (relevance.n_images, relevance.n_captions) == (1000, 5000)
    expected = relevance_dense(lines[:5000])[:20]
    np.testing.assert_allclose(relevance.matrix(np.arange(20)), expected, atol=1e-6)
    np.testing.assert_allclose(dev.relevance.matrix(np.arange(20)), expected, atol=1e-6)


def test_vocabulary_keeps_words_seen_at_least_4_times(tmp_path):
    folder = tmp_path / "toy_precomp"
    folder.mkdir()
    (folder / "train_caps.txt").write_text("four three\nfour three\nfour three\n")
    (folder / "dev_caps.txt").write_text("four five\n")
    vocab_module.main(["--data_path", str(tmp_path), "--data_name", "toy_precomp", "--vocab_path", str(tmp_path)])
    built = vocab_module.deserialize_vocab(str(tmp_path / "toy_precomp_vocab.json"))
    assert list(built.word2idx) == ["<pad>", "<start>", "<end>", "<unk>", "four"]
