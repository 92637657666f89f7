"""VSE∞'s GPO (--vse_pool gpo) and PCME++ (--module_name PCMEpp) against restatements written from their papers
and published code; every default and constant of the embedding modules pinned to its published source; PCME
at its real initial a = b = 30; make_synthetic_data --binding.

The restatements redo everything after the shared encoders one item or one pair at a time, in float64:
the bi-GRU of GPO step by step from the GRU equations, the sort per dimension over an item's real positions,
PCME++'s closed-form sampled distance from its definition, its losses from their formulas.
"""
import hashlib
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch

import checkpoint
import data
import embedding_models
import errors
import evaluation
import make_synthetic_data
import opts
import pcme_loss
import train
from model import SimilarityModel
from tests.test_embedding import (check_step, daa_terms_direct, double_model, hinge_loop, match_probability_loop,
                                  model_noise, pcme_gaussians_loop, run_argv, samples_loop, tiny_batch)
from tests.test_model import make_opt
from tests.test_train import TINY_DIMS, scores, short, train_argv  # noqa: F401 (fixture)

# ------------------------------------------------------------------------------------------------
# Published values, written out here from their sources (not read from the project):
# VSE∞, woodfrog/vse_infty lib/modules/aggr/gpo.py: GPO(d_pe=32, d_hidden=32); positional_encoding_1d(32, L);
# nn.GRU(32, 32, 1, bidirectional=True), the directions averaged; nn.Linear(32, 1, bias=False);
# softmax(scores / 0.1) over the positions.
GPO_PE, GPO_HIDDEN, GPO_TEMPERATURE = 32, 32, 0.1
# PCME, naver-ai/pcme config/coco/pcme_coco.yaml: num_samples 7, vib_beta 0.00001, init_negative_scale 15 and
# init_shift 15 in its sigma(x) = e^x / (e^x + e^-x) = sigmoid(2x): a = b = 30 in the plain sigmoid.
PCME_SAMPLES, PCME_VIB, PCME_A, PCME_B = 7, 1e-5, 30.0, 30.0
# PCME++, naver-ai/pcmepp configs/pcmepp.yaml: init_negative_scale 5, init_shift 5, vib_beta 0.0001,
# smoothness_alpha 0.1 (the weight of the pseudo-positive matching loss).
PCMEPP_A, PCMEPP_B, PCMEPP_VIB, PCMEPP_PSEUDO = 5.0, 5.0, 1e-4, 0.1
# This project's own choices (assets/embedding_models.md): VSE pools by the mean unless told; PCME's and PCME++'s Gaussians start
# with a noise of norm 0.1 (sum of the variances 0.01); make_synthetic_data names half the objects' colours.
VSE_POOL, INITIAL_NOISE_NORM, BINDING = "mean", 0.1, 0.5


# ------------------------------------------------------------------------------------------------
# Restatements


def positions_loop(n, dim=GPO_PE):
    """The Transformer's sin/cos encoding of positions 0..n-1, element by element: (n, dim) float64."""
    return torch.tensor([[math.sin(p / 10000 ** (k / dim)) if k % 2 == 0 else math.cos(p / 10000 ** ((k - 1) / dim))
                          for k in range(dim)] for p in range(n)], dtype=torch.float64)


def gru_loop(gru, inputs, suffix):
    """One direction of a one-layer GRU over inputs (n, in), step by step from the GRU equations: (n, hidden)."""
    w_ih, w_hh = getattr(gru, "weight_ih_l0" + suffix), getattr(gru, "weight_hh_l0" + suffix)
    b_ih, b_hh = getattr(gru, "bias_ih_l0" + suffix), getattr(gru, "bias_hh_l0" + suffix)
    size = w_hh.shape[1]
    h, out = inputs.new_zeros(size), []
    for x in inputs:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:size] + gh[:size])
        z = torch.sigmoid(gi[size:2 * size] + gh[size:2 * size])
        n = torch.tanh(gi[2 * size:] + r * gh[2 * size:])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)


def gpo_loop(gpo, local, length):
    """GPO of one item from its first `length` positions (P, d) -> (d,): its values sorted in descending order
    per dimension, weighted by a softmax at temperature 0.1 of the scores the bi-GRU gives the positions."""
    encoded = positions_loop(length).to(local.dtype)
    hidden = (gru_loop(gpo.gru, encoded, "") + gru_loop(gpo.gru, encoded.flip(0), "_reverse").flip(0)) / 2
    weights = torch.softmax(hidden @ gpo.linear.weight[0] / GPO_TEMPERATURE, 0)
    ranked = local[:length].sort(dim=0, descending=True).values
    return (weights[:, None] * ranked).sum(0)


def unit(vector):
    return vector / (vector.norm() + 1e-8)


def vse_gpo_scores_loop(net, images, captions, lengths):
    regions, words = net.img_enc(images), net.txt_enc(captions, lengths)
    head = net.sim_enc
    v = [unit(gpo_loop(head.image_pool, regions[i], 36)) for i in range(len(images))]
    t = [unit(gpo_loop(head.caption_pool, words[j], int(lengths[j]))) for j in range(len(captions))]
    return torch.stack([torch.stack([torch.dot(vi, tj) for tj in t]) for vi in v])


def gaussian_loop(head, local, length):
    """PCME++'s Gaussian of one item: (mean, log-variance), each (d,)."""
    variance_features = local @ head.variance_fc.weight.t() + head.variance_fc.bias
    return unit(gpo_loop(head.mean_pool, local, length)), gpo_loop(head.variance_pool, variance_features, length)


def pcmepp_gaussians_loop(net, images, captions, lengths):
    regions, words = net.img_enc(images), net.txt_enc(captions, lengths)
    head = net.sim_enc
    return ([gaussian_loop(head.image_head, regions[i], 36) for i in range(len(images))],
            [gaussian_loop(head.caption_head, words[j], int(lengths[j])) for j in range(len(captions))])


def csd_loop(img_g, cap_g):
    """CSD(i, j) = ||mu_i - mu_j||^2 + sum sigma_i^2 + sum sigma_j^2, pair by pair: (n_i, n_c)."""
    return torch.stack([torch.stack([(mi - mj).square().sum() + vi.exp().sum() + vj.exp().sum() for mj, vj in cap_g])
                        for mi, vi in img_g])


def bce(logit, label):
    """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] of one pair."""
    p = torch.sigmoid(logit)
    return -(label * torch.log(p) + (1 - label) * torch.log(1 - p))


# ------------------------------------------------------------------------------------------------
# GPO


def test_gpo_pools_as_its_restatement_for_every_length_and_ignores_padding():
    """Lengths 1..9 in one batch, padded positions full of large values of both signs: the pooled vectors and
    the gradients (features and GRU/linear weights) equal the item-by-item restatement."""
    torch.manual_seed(0)
    gpo = embedding_models.GPO().double()
    lengths = torch.tensor([9, 1, 4, 7, 2, 5, 8, 3, 6])
    local = torch.randn(9, 9, 5, dtype=torch.float64)
    mask = embedding_models.word_mask(lengths, 9, "cpu")
    local = torch.where(mask[..., None], local, 1e3 * torch.randn(9, 9, 5, dtype=torch.float64)).requires_grad_()
    pooled = gpo(local, mask)
    expected = torch.stack([gpo_loop(gpo, local[i], int(lengths[i])) for i in range(9)])
    torch.testing.assert_close(pooled, expected, rtol=1e-10, atol=1e-12)
    probe = torch.randn(9, 5, dtype=torch.float64)
    inputs = [local, *gpo.parameters()]
    fast = torch.autograd.grad((pooled * probe).sum(), inputs)
    slow = torch.autograd.grad((expected * probe).sum(), inputs)
    for g_fast, g_slow in zip(fast, slow):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-12)
    assert float(fast[0][~mask].abs().max()) == 0  # padding gets no gradient
    # length 1: the one position's vector itself; every length: weights summing to 1, 0 beyond the length
    torch.testing.assert_close(pooled[1], local[1, 0].detach(), rtol=0, atol=1e-15)
    weights = gpo.weights(lengths, 9).detach()
    torch.testing.assert_close(weights.sum(1), torch.ones(9, dtype=torch.float64))
    assert float(weights[~mask].abs().max()) == 0


def test_gpo_sorts_each_dimension():
    """A permutation of an item's real positions does not change its pooled vector; with one position far above
    the others in every dimension GPO gives w_1 times it plus the rest, as the weights of the sorted values."""
    torch.manual_seed(1)
    gpo = embedding_models.GPO().double()
    local = torch.randn(1, 6, 4, dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    shuffled = local[:, torch.randperm(6)]
    torch.testing.assert_close(gpo(shuffled, mask), gpo(local, mask), rtol=0, atol=1e-14)
    weights = gpo.weights(torch.tensor([6]), 6)[0].detach()
    ranked = local[0].sort(0, descending=True).values
    torch.testing.assert_close(gpo(local, mask)[0], weights @ ranked, rtol=0, atol=1e-14)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 6))  # neither a plain mean ...
    assert float(weights.max()) < 1 - 1e-6  # ... nor a plain max at the start


def test_vse_gpo_scores_and_training_step_equal_the_restatement():
    net = double_model("VSE", vse_pool="gpo")
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        fast = net.eval().similarity(net.encode_images(images), net.encode_captions(captions, lengths), lengths)
        torch.testing.assert_close(fast, vse_gpo_scores_loop(net, images, captions, lengths), rtol=1e-9, atol=1e-12)

    def restated(net, images, captions, lengths, relevance):
        S = vse_gpo_scores_loop(net, images, captions, lengths)
        hinge = hinge_loop(S)
        i2t, t2i = daa_terms_direct(S, relevance, 3.0)
        return {"loss": hinge + i2t + t2i, "contrastive_loss": hinge, "daa_i2t_loss": i2t, "daa_t2i_loss": t2i}

    check_step("VSE", [], restated, vse_pool="gpo")


# ------------------------------------------------------------------------------------------------
# PCME++


def test_pcmepp_scores_are_minus_csd_of_the_restated_gaussians():
    """Eval mode: -CSD; training: -CSD (what DAA ranks) and the logits -a CSD + b, at PCME++'s initial a = b = 5."""
    net = double_model("PCMEpp")
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        img_g, cap_g = pcmepp_gaussians_loop(net, images, captions, lengths)
        csd = csd_loop(img_g, cap_g)
        batch = net(images, captions, lengths)
        torch.testing.assert_close(batch.sims, -csd, rtol=1e-9, atol=1e-12)
        scale, shift = net.sim_enc.log_scale.exp(), net.sim_enc.shift
        assert float(scale) == pytest.approx(PCMEPP_A, rel=1e-6) and float(shift) == PCMEPP_B
        torch.testing.assert_close(batch.logits, -scale * csd + shift, rtol=1e-9, atol=1e-12)
        net.eval()
        img_embs, cap_embs = net.encode_images(images), net.encode_captions(captions, lengths)
        torch.testing.assert_close(net.similarity(img_embs, cap_embs, lengths), -csd, rtol=1e-9, atol=1e-12)
        # any block of the gallery is scored on its own: row and column terms come from each item alone
        torch.testing.assert_close(net.similarity(img_embs[2:4], cap_embs[1:5], lengths[1:5]), -csd[2:4, 1:5],
                                   rtol=1e-9, atol=1e-12)
    assert float(csd.max() - csd.min()) > 0.1


def test_pcmepp_step_loss_and_gradients_equal_the_restatement():
    vib_weight, pseudo_weight = 0.5, 0.7  # large enough that each term shows in every gradient
    seen = {}

    def restated(net, images, captions, lengths, relevance):
        img_g, cap_g = pcmepp_gaussians_loop(net, images, captions, lengths)
        csd = csd_loop(img_g, cap_g)
        logit = -net.sim_enc.log_scale.exp() * csd + net.sim_enc.shift
        n = len(csd)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        # PCME++'s means over the n x n pairs, times n^2: sums over the pairs
        matching = 2 * sum(bce(logit[i, j], float(i == j)) for i, j in pairs)
        i2t_labels = {(i, j): float(logit[i, j] >= logit[i, i]) for i, j in pairs}  # image i's pseudo-positives
        t2i_labels = {(i, j): float(logit[i, j] >= logit[j, j]) for i, j in pairs}  # caption j's
        seen["pseudo"] = sum(i2t_labels.values()) + sum(t2i_labels.values()) - 2 * n
        pseudo = pseudo_weight * sum(bce(logit[i, j], i2t_labels[i, j]) + bce(logit[i, j], t2i_labels[i, j])
                                     for i, j in pairs)
        kl = n ** 2 * sum(sum(0.5 * (v.exp() + m.square() - 1 - v).sum() for m, v in side) / (n * len(side[0][0]))
                          for side in (img_g, cap_g))
        i2t, t2i = daa_terms_direct(-csd, relevance, 3.0)
        return {"loss": matching + pseudo + vib_weight * kl + i2t + t2i, "contrastive_loss": matching,
                "pseudo_positive_loss": pseudo, "vib_loss": vib_weight * kl, "daa_i2t_loss": i2t, "daa_t2i_loss": t2i}

    check_step("PCMEpp", ["--pcmepp_vib_weight", str(vib_weight), "--pcmepp_pseudo_weight", str(pseudo_weight)],
               restated)
    assert seen["pseudo"] > 0  # pairs other than the own ones were pseudo-positives


def test_pcmepp_pseudo_positives_on_known_matrices():
    """Labels 1 where a pair's logit is at least its query's own pair's: image i (row i) against logit[i, i],
    caption j (column j) against logit[j, j]; the two directions' labels differ in general."""
    cases = [([[2.0, 3.0], [-1.0, 0.0]], [[1, 1], [0, 1]], [[1, 1], [0, 1]]),  # 3 >= 2 (image 0), 3 >= 0 (caption 1)
             ([[2.0, 1.0], [3.0, 0.0]], [[1, 0], [1, 1]], [[1, 1], [1, 1]])]  # 3 >= 0 (image 1); 3 >= 2, 1 >= 0
    for logits, i2t_labels, t2i_labels in cases:
        logits = torch.tensor(logits, dtype=torch.float64)
        expected = sum(bce(logits, torch.tensor(y, dtype=torch.float64)).mean() for y in (i2t_labels, t2i_labels))
        torch.testing.assert_close(pcme_loss.pseudo_positive_matching(logits), expected)


def test_pcmepp_center_means_subtracts_the_batch_mean_in_training_and_the_running_centre_in_eval():
    """--pcmepp_center_means: mean = l2norm(GPO - centre), the centre the batch's mean in training (the running
    centre moving 0.1 of the way to it) and the running centre in eval mode; off, the head has no buffer."""
    assert not any("running_center" in name for name, _ in embedding_model("PCMEpp").named_buffers())
    head = embedding_model("PCMEpp", pcmepp_center_means=True).sim_enc.image_head.double()
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(5, 7, 32, generator=gen, dtype=torch.float64)
    mask = torch.ones(5, 7, dtype=torch.bool)
    pooled = head.mean_pool(local, mask)
    out = head(local, mask)
    torch.testing.assert_close(out[:, 0], torch.nn.functional.normalize(pooled - pooled.mean(0), dim=1))
    torch.testing.assert_close(head.running_center, 0.1 * pooled.mean(0).detach())
    head.eval()
    torch.testing.assert_close(head(local[:2], mask[:2])[:, 0],
                               torch.nn.functional.normalize(pooled[:2] - 0.1 * pooled.mean(0), dim=1))
    assert torch.equal(head.running_center, 0.1 * pooled.mean(0).detach())  # eval mode leaves it
    # a checkpoint keeps the running centres, and its options rebuild the centring heads
    net = embedding_model("PCMEpp", pcmepp_center_means=True)
    net.sim_enc.caption_head.running_center.fill_(0.25)
    ckpt = {"opt": make_opt("PCMEpp", pcmepp_center_means=True), "model": net.state_dicts()}
    rebuilt = SimilarityModel.from_checkpoint(ckpt, "ckpt")
    assert rebuilt.sim_enc.caption_head.center and float(rebuilt.sim_enc.caption_head.running_center[0]) == 0.25


def test_pcmepp_pairs_of_an_image_drawn_twice_are_matches():
    """Two captions of one image in a batch (image ids 0 and 0): PCME++'s training step labels both pairs 1 in
    the matching and the pseudo-positive BCE; train.compute_losses takes them from the batch's image ids."""
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    image_ids = torch.tensor([0, 1, 0, 2, 3])
    same = image_ids[:, None] == image_ids[None, :]
    criterion = pcme_loss.PCMEppLoss(vib_weight=0, daa_weight=0)
    batch = embedding_models.PCMEBatch(-logits, logits, torch.zeros((), dtype=torch.float64))
    losses = criterion(batch, None, matches=same)
    labels = same.double()
    i2t = torch.maximum(labels, (logits >= logits.diagonal()[:, None]).double())
    t2i = torch.maximum(labels, (logits >= logits.diagonal()[None, :]).double())
    torch.testing.assert_close(losses["contrastive_loss"], 25 * 2 * bce(logits, labels).mean())
    torch.testing.assert_close(losses["pseudo_positive_loss"],
                               25 * 0.1 * (bce(logits, i2t).mean() + bce(logits, t2i).mean()))
    diagonal = criterion(batch, None)  # without matches: the diagonal only, as before
    torch.testing.assert_close(diagonal["contrastive_loss"],
                               25 * 2 * bce(logits, torch.eye(5, dtype=torch.float64)).mean())
    # the training step: compute_losses with the batch's image ids equals the criterion given their matches
    net = embedding_model("PCMEpp").double()
    images, captions, lengths = tiny_batch(5)
    relevance = torch.rand(5, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    with_ids = train.compute_losses(net, criterion, images, captions, lengths, relevance, False, image_ids=image_ids)
    torch.manual_seed(1)
    outputs = net(images, captions, lengths)
    torch.testing.assert_close(with_ids["loss"], criterion(outputs, relevance, matches=same)["loss"])
    assert not torch.allclose(with_ids["loss"], criterion(outputs, relevance)["loss"])



# ------------------------------------------------------------------------------------------------
# Runs: checkpoints, resume, evaluation, ensembles, shortlist, refusals


@pytest.fixture(scope="module")
def pcmepp_run(synth, short, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcmepp")
    assert errors.run(train.main, run_argv(synth, short, out, "PCMEpp", "--accum_steps", "2")) == 0
    return out


@pytest.fixture(scope="module")
def gpo_run(synth, short, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpo")
    assert errors.run(train.main, run_argv(synth, short, out, "VSE", "--vse_pool", "gpo")) == 0
    return out


def test_pcmepp_and_gpo_checkpoints_rebuild_and_resume(pcmepp_run, gpo_run, tmp_path):
    head_keys = {"PCMEpp": {"log_scale", "shift", "image_head.mean_pool.gru.weight_ih_l0", "caption_head.variance_fc.weight"},
                 "VSE": {"image_pool.gru.weight_hh_l0_reverse", "caption_pool.linear.weight"}}
    for run, module_name in ((pcmepp_run, "PCMEpp"), (gpo_run, "VSE")):
        keys = head_keys[module_name]
        path = str(run / "run" / "checkpoint_0.pth.tar")
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["opt"].module_name == module_name
        assert keys <= {key.split(".", 1)[1] for key in ckpt["model"][2]}
        net = SimilarityModel.from_checkpoint(ckpt, path)
        assert net.embedding and not net.training
    argv = ["--resume", str(pcmepp_run / "run"), "--num_epochs", "2", "--model_name", str(tmp_path / "branch"),
            "--logger_name", str(tmp_path / "log")]
    assert errors.run(train.main, argv) == 0
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "branch" / "checkpoint_1.pth.tar"))
    assert ckpt["epoch"] == 2 and ckpt["opt"].module_name == "PCMEpp" and ckpt["opt"].accum_steps == 2


def test_pcmepp_evaluation_is_minus_csd_of_the_encoded_gaussians(pcmepp_run, synth, tmp_path):
    path = str(pcmepp_run / "run" / "model_best.pth.tar")
    sims_file, json_file = str(tmp_path / "s.npy"), str(tmp_path / "r.json")
    report = scores(path, synth, "test", "--save_sims", sims_file, "--json", json_file, "--shard_size", "7")
    ckpt = checkpoint.load_checkpoint(path)
    net = SimilarityModel.from_checkpoint(ckpt, path)
    vocab = evaluation.vocab_lib.vocab_from_word2idx(ckpt["vocab"], "the checkpoint's vocabulary")
    image_loader, caption_loader, dataset = data.get_eval_loaders(synth.data_path, "f30k_precomp", "test", vocab, 16, 0)
    img_embs, captions = evaluation.encode(net, image_loader, caption_loader, "cpu")
    (_, cap_embs, _), = captions
    mu_i, var_i = img_embs[:, 0].double().numpy(), np.exp(img_embs[:, 1].double().numpy())
    mu_j, var_j = cap_embs[:, 0].double().numpy(), np.exp(cap_embs[:, 1].double().numpy())
    csd = ((mu_i[:, None] - mu_j[None]) ** 2).sum(2) + var_i.sum(1)[:, None] + var_j.sum(1)[None, :]
    np.testing.assert_allclose(np.load(sims_file), -csd, rtol=0, atol=2e-6)
    assert report["rsum"] == evaluation.score_matrix(np.load(sims_file), dataset.relevance.matrix())["rsum"]
    assert report["pcme_scoring"] == evaluation.PCMEPP_SCORING
    assert float(np.ptp(var_i.sum(1))) > 0  # the variance terms differ between items: a real row term


def test_ensembles_and_shortlists_take_pcmepp_and_gpo(pcmepp_run, gpo_run, synth, tmp_path):
    pcmepp, gpo = (str(run / "run" / "model_best.pth.tar") for run in (pcmepp_run, gpo_run))
    pair = scores(pcmepp, synth, "test", "--model_path2", gpo, "--save_sims", str(tmp_path / "pair.npy"))
    for k, path in enumerate((pcmepp, gpo)):
        scores(path, synth, "test", "--save_sims", str(tmp_path / f"{k}.npy"))
    mean = (np.load(tmp_path / "0.npy") + np.load(tmp_path / "1.npy")) / 2
    np.testing.assert_allclose(np.load(tmp_path / "pair.npy"), mean, rtol=0, atol=1e-6)
    assert pair["pcme_scoring"] == evaluation.PCMEPP_SCORING
    # a PCME++ shortlist for an SAF model (untrained, of the same data): of the whole gallery, the SAF's plain
    # scores; of 5 candidates, fewer pairs scored
    saf = str(tmp_path / "saf.pth.tar")
    opt = opts.parse_opt(["--data_name", "f30k_precomp", "--img_dim", str(synth.feat_dim), *TINY_DIMS,
                          "--module_name", "SAF"])
    words = checkpoint.load_checkpoint(pcmepp)["vocab"]
    opt.vocab_size = len(words)
    torch.manual_seed(0)
    checkpoint.save_checkpoint({"epoch": 0, "model": SimilarityModel(opt).state_dicts(), "best_rsum": 0.0, "opt": opt,
                                "Eiters": 0, "vocab": words}, saf)
    plain = scores(saf, synth, "test")
    whole = scores(saf, synth, "test", "--shortlist", pcmepp, "--shortlist_k", "200")
    assert whole["rsum"] == plain["rsum"] and whole["shortlist"]["module_name"] == "PCMEpp"
    five = scores(saf, synth, "test", "--shortlist", pcmepp, "--shortlist_k", "5")
    assert five["shortlist"]["pairs_scored"] < five["shortlist"]["pairs_total"]


@pytest.mark.parametrize("extra, message", [
    (["--module_name", "SGR", "--vse_pool", "gpo"], "--vse_pool is a VSE option, but this run trains an SGR model"),
    (["--module_name", "SAF", "--vse_pool", "gpo"], "--vse_pool is a VSE option, but this run trains an SAF model"),
    (["--module_name", "PCMEpp", "--vse_pool", "gpo"], "--vse_pool is a VSE option, but this run trains a PCMEpp"),
    (["--module_name", "PCME", "--pcmepp_vib_weight", "0.1"], "--pcmepp_vib_weight is a PCMEpp option, but this run "
                                                              "trains a PCME model"),
    (["--module_name", "VSE", "--pcmepp_pseudo_weight", "0.2"], "--pcmepp_pseudo_weight is a PCMEpp option"),
    (["--module_name", "SAF", "--pcmepp_pseudo_weight", "0.2"], "--pcmepp_pseudo_weight is a PCMEpp option"),
    (["--module_name", "PCMEpp", "--pcme_samples", "3"], "--pcme_samples is a PCME option, but this run trains a "
                                                         "PCMEpp model"),
    (["--module_name", "PCME", "--margin", "0.1"], "--margin is an SGR/SAF/VSE option, but this run trains a PCME "
                                                   "model"),
    (["--module_name", "PCMEpp", "--warmup_epochs", "1"], "--warmup_epochs is an SGR/SAF/VSE option, but this run "
                                                         "trains a PCMEpp model"),
    (["--module_name", "PCME", "--no_max_violation"], "--max_violation/--no_max_violation is an SGR/SAF/VSE option, "
                                                      "but this run trains a PCME model"),
    (["--module_name", "PCMEpp", "--max_violation"], "--max_violation/--no_max_violation is an SGR/SAF/VSE option"),
    (["--module_name", "PCMEpp", "--pcmepp_pseudo_weight", "-1"], "must be numbers of at least 0"),
    (["--module_name", "PCMEpp", "--pcmepp_vib_weight", "nan"], "must be numbers of at least 0"),
    (["--module_name", "VSE", "--pcmepp_init_shift", "10"], "--pcmepp_init_shift is a PCMEpp option"),
    (["--module_name", "VSE", "--pcmepp_center_means"], "--pcmepp_center_means is a PCMEpp option"),
    (["--module_name", "PCMEpp", "--pcmepp_init_scale", "0"], "--pcmepp_init_scale must be a finite number above 0"),
    (["--module_name", "PCMEpp", "--pcmepp_init_shift", "inf"], "--pcmepp_init_shift a finite number"),
])
def test_options_of_another_module_are_refused(synth, short, tmp_path, capsys, extra, message):
    argv = train_argv(synth, tmp_path, data_path=short) + extra
    assert errors.run(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "log")


def test_resume_cannot_change_the_pooling(gpo_run, tmp_path, capsys):
    argv = ["--resume", str(gpo_run / "run"), "--num_epochs", "2", "--model_name", str(tmp_path / "b"),
            "--vse_pool", "mean"]
    assert errors.run(train.main, argv) == 2
    assert "--vse_pool: " in capsys.readouterr().err and not os.path.exists(tmp_path / "b")


# ------------------------------------------------------------------------------------------------
# Every default and constant of the embedding modules, against the published values above


def test_embedding_options_default_to_their_published_values():
    opt = opts.parse_opt([])
    assert (opt.vse_pool, opt.pcme_samples, opt.pcme_vib_weight) == (VSE_POOL, PCME_SAMPLES, PCME_VIB)
    assert (opt.pcmepp_vib_weight, opt.pcmepp_pseudo_weight) == (PCMEPP_VIB, PCMEPP_PSEUDO)
    pcme = train.build_criterion(opts.parse_opt(["--module_name", "PCME"]))
    pcmepp = train.build_criterion(opts.parse_opt(["--module_name", "PCMEpp"]))
    assert pcme.vib_weight == PCME_VIB and (pcmepp.vib_weight, pcmepp.pseudo_weight) == (PCMEPP_VIB, PCMEPP_PSEUDO)
    assert pcme_loss.PCMELoss().vib_weight == PCME_VIB
    assert (pcme_loss.PCMEppLoss().vib_weight, pcme_loss.PCMEppLoss().pseudo_weight) == (PCMEPP_VIB, PCMEPP_PSEUDO)
    assert (opt.pcmepp_init_scale, opt.pcmepp_init_shift) == (PCMEPP_A, PCMEPP_B)
    hinge = ("SGR", "SAF", "VSE")
    assert opts.MODULE_OPTIONS == {"vse_pool": ("VSE",), "pcme_samples": ("PCME",), "pcme_vib_weight": ("PCME",),
                                   "pcmepp_vib_weight": ("PCMEpp",), "pcmepp_pseudo_weight": ("PCMEpp",),
                                   "pcmepp_init_scale": ("PCMEpp",), "pcmepp_init_shift": ("PCMEpp",),
                                   "pcmepp_center_means": ("PCMEpp",),
                                   "margin": hinge, "max_violation": hinge, "warmup_epochs": hinge}
    assert opt.pcmepp_center_means is False  # PCME++ has no centring: off unless asked


def embedding_model(module_name, **changes):
    torch.manual_seed(0)
    return SimilarityModel(make_opt(module_name, **{"vse_pool": VSE_POOL, "pcme_samples": PCME_SAMPLES, **changes}))


def test_embedding_heads_start_at_their_published_values():
    """a and b of PCME (30, 30) and PCME++ (5, 5), PCME's 7 samples, GPO's shapes, the initial noise norm."""
    pcme, pcmepp = embedding_model("PCME").sim_enc, embedding_model("PCMEpp").sim_enc
    assert pcme.samples == PCME_SAMPLES
    moved = embedding_model("PCMEpp", pcmepp_init_scale=8.0, pcmepp_init_shift=12.0).sim_enc  # the options' a, b
    assert float(moved.log_scale.detach().exp()) == pytest.approx(8.0, rel=1e-6) and float(moved.shift.detach()) == 12.0
    for head, a, b in ((pcme, PCME_A, PCME_B), (pcmepp, PCMEPP_A, PCMEPP_B)):
        assert float(head.log_scale.detach().exp()) == pytest.approx(a, rel=1e-6) and float(head.shift.detach()) == b
    d = 32  # make_opt's embed_size: sum of d variances exp(bias) = 0.1^2
    for bias in (pcme.image_head.fc2.bias.detach(), pcmepp.image_head.variance_fc.bias.detach(),
                 pcmepp.caption_head.variance_fc.bias.detach()):
        assert float(d * bias.exp().max()) == pytest.approx(INITIAL_NOISE_NORM ** 2, rel=1e-6)
        assert float(bias.max()) == float(bias.min())
    assert list(embedding_model("VSE").sim_enc.parameters()) == []  # mean pooling learns nothing
    for gpo in (embedding_model("VSE", vse_pool="gpo").sim_enc.image_pool, pcmepp.caption_head.mean_pool):
        gru = gpo.gru
        assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == (GPO_PE, GPO_HIDDEN, 1, True)
        assert (gpo.linear.in_features, gpo.linear.out_features, gpo.linear.bias) == (GPO_HIDDEN, 1, None)
    assert (embedding_models.GPO_PE_DIM, embedding_models.GPO_HIDDEN, embedding_models.GPO_TEMPERATURE) == (GPO_PE, GPO_HIDDEN, GPO_TEMPERATURE)
    torch.testing.assert_close(embedding_models.sinusoid_positions(40, GPO_PE, torch.float64), positions_loop(40))


def test_pcme_probability_is_pcmes_sigma_at_15():
    """sigmoid(-30 d + 30) of the plain sigmoid = PCME's e^x / (e^x + e^-x) at x = -15 d + 15, d PCME's
    sqrt(||mu_i - mu_j||^2 + 1e-6): PCME's evaluation at a = b = 30 at four known distances."""
    head = embedding_model("PCME").sim_enc.double().eval()
    with torch.no_grad():
        head.log_scale.fill_(math.log(PCME_A))
        head.shift.fill_(PCME_B)
    mean = torch.zeros(4, 32, dtype=torch.float64)
    mean[0, 0] = 1.0
    mean[1, 0], mean[1, 1] = math.cos(0.3), math.sin(0.3)
    mean[2, 0], mean[2, 1] = math.cos(1.0), math.sin(1.0)
    mean[3, 1] = 1.0
    gaussians = torch.stack([mean, torch.zeros_like(mean)], 1)
    with torch.no_grad():
        got = head(gaussians[:1], gaussians)[0]
    for j, score in enumerate(got.tolist()):
        x = -15 * math.sqrt(float((mean[0] - mean[j]).square().sum()) + 1e-6) + 15
        assert score == pytest.approx(math.exp(x) / (math.exp(x) + math.exp(-x)), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# PCME at its real initial values a = b = 30


def test_pcme_sampled_scores_at_the_initial_a_b_30_equal_the_restatement():
    """The scores of random pairs at a = b = 30 are about 1e-5 or less: compared relative to their size."""
    net = double_model("PCME", pcme_samples=3)
    with torch.no_grad():
        net.sim_enc.log_scale.fill_(math.log(PCME_A))
        net.sim_enc.shift.fill_(PCME_B)
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        torch.manual_seed(5)
        batch = net(images, captions, lengths)
        torch.manual_seed(5)
        img_noise, cap_noise = model_noise(6, 3, 32)
        img_g, cap_g = pcme_gaussians_loop(net, images, captions, lengths)
        expected = match_probability_loop(samples_loop(img_g, img_noise), samples_loop(cap_g, cap_noise),
                                          net.sim_enc.log_scale.exp(), net.sim_enc.shift)
    torch.testing.assert_close(batch.sims, expected, rtol=1e-9, atol=0)
    # most scores lie below an absolute tolerance 2e-6 a = 6e-5, which would pass any of them
    assert float(expected.median()) < 2e-6 * PCME_A and float(expected.min()) > 0


def pcme_eval(means, a, b, dtype):
    """PCME's eval-mode scores of unit means (n, d) against themselves, head at a and b, in `dtype`."""
    head = embedding_model("PCME").sim_enc.to(dtype).eval()
    with torch.no_grad():
        head.log_scale.fill_(math.log(a))
        head.shift.fill_(b)
        gaussians = torch.stack([means, torch.zeros_like(means)], 1).to(dtype)
        return head(gaussians, gaussians)


def test_pcme_evaluation_ranks_as_the_means_cosine_unless_float32_ties_near_pairs():
    """assets/embedding_models.md's claim, tested: evaluation by the means ranks every row as the means' cosine (exactly, where
    the probabilities stay apart, as at a = b = 5 with random means), but at the initial a = b = 30 the float32
    probability of every pair with a cosine above about 0.9 is 1.0, so they tie where the cosine ranks them."""
    gen = torch.Generator().manual_seed(0)
    means = torch.nn.functional.normalize(torch.randn(30, 32, generator=gen, dtype=torch.float64), dim=1)
    cosine = means @ means.t()
    scores5 = pcme_eval(means, 5.0, 5.0, torch.float32)
    assert torch.equal(scores5.argsort(dim=1, descending=True, stable=True),
                       cosine.argsort(dim=1, descending=True, stable=True))
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.5])  # cosines 1, 0.995, 0.980, 0.955, 0.07
    near = torch.zeros(5, 32, dtype=torch.float64)
    near[:, 0], near[:, 1] = angles.cos(), angles.sin()
    exact, single = pcme_eval(near, PCME_A, PCME_B, torch.float64)[0], pcme_eval(near, PCME_A, PCME_B, torch.float32)[0]
    assert bool((exact[:4].diff() < 0).all())  # float64 ranks the four near ones apart, as their cosines
    assert single[:4].tolist() == [1.0] * 4 and float(single[4]) < 1.0  # float32 ties them at 1.0


# ------------------------------------------------------------------------------------------------
# make_synthetic_data --binding

# sha256 over the sorted (path, bytes) of every file `make_synthetic_data.py --tiny` wrote before --binding
# existed (commit 6d1ef13), the manifests left out (they hold modification times).
TODAYS_TINY_DATA = "fa3633d6b01cedbeb99d4eb807289f10d3ba86160e9e8f5f941e3977986f43b2"
COLOUR_WORD = re.compile(r"\b(?:" + "|".join(make_synthetic_data.COLOURS) + r") ")


def make_tiny(out, *extra):
    argv = ["--tiny", "--out_dir", str(out / "data"), "--vocab_dir", str(out / "vocab"), "--ann_dir", str(out / "ann")]
    return errors.run(make_synthetic_data.main, argv + list(extra))


def digest(root):
    sha = hashlib.sha256()
    files = (p for p in pathlib.Path(root).rglob("*") if p.is_file() and p.name != make_synthetic_data.MANIFEST)
    for path in sorted(files):
        sha.update(path.relative_to(root).as_posix().encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def test_binding_default_writes_todays_data_byte_for_byte(tmp_path):
    assert make_synthetic_data.build_parser().parse_args([]).binding == BINDING
    assert make_tiny(tmp_path / "default") == 0 and make_tiny(tmp_path / "half", "--binding", "0.5") == 0
    assert digest(tmp_path / "default") == TODAYS_TINY_DATA == digest(tmp_path / "half")


def test_binding_changes_only_the_colour_words(tmp_path):
    """F = 0: no colour word (a caption names categories, counts, scene: what a pooled vector holds); F = 1:
    every object phrase names its colour. The captions without their colour words, and the features, are the
    same for every F; the share of phrases naming a colour is F (1 colour word per phrase at F = 1)."""
    captions, features = {}, {}
    for share in ("0", "0.5", "1"):
        assert make_tiny(tmp_path / share, "--binding", share) == 0
        folder = tmp_path / share / "data" / "coco_precomp"
        captions[share] = [(folder / f"{s}_caps.txt").read_text() for s in ("train", "dev", "test", "testall")]
        features[share] = [(folder / f"{s}_ims.npy").read_bytes() for s in ("train", "dev", "test", "testall")]
    counts = {share: sum(len(COLOUR_WORD.findall(text)) for text in texts) for share, texts in captions.items()}
    assert counts["0"] == 0 and 0.4 < counts["0.5"] / counts["1"] < 0.6
    for share in ("0.5", "1"):
        assert [COLOUR_WORD.sub("", text) for text in captions[share]] == captions["0"]
        assert features[share] == features["0"]


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_binding_outside_0_1_is_refused(tmp_path, capsys, value):
    assert make_tiny(tmp_path / "bad", "--binding", value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--binding" in err
    assert not (tmp_path / "bad").exists()
