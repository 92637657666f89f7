"""The embedding models VSE and PCME: scores, loss and gradients against plain restatements, checkpoints,
option refusals, evaluation's matrix-product path, ensembles, and (slow) that both learn and run on DDP.

The restatements start from the shared encoders' local features (EncoderImage's regions, EncoderText's
words, tested elsewhere) and redo everything after them one pair or one item at a time, in float64.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import data
import errors
import evaluation
import opts
import train
from model import SimilarityModel
from tests.test_model import dropout_off, make_opt
from tests.test_train import LEARNING_RUN, SMALL_DIMS, TINY_DIMS, scores, short, train_argv  # noqa: F401 (fixture)
from tools.baselines.daa_direct import asp_soft_direct

TEMP = 0.05  # a DAA temperature under which random scores give non-trivial gradients


def embedding_opt(module_name, **changes):
    """make_opt's tiny dims with the embedding options at their defaults."""
    defaults = {"vse_pool": "mean", "pcme_samples": 3, "pcme_vib_weight": 0.01}
    return make_opt(module_name, **{**defaults, **changes})


def tiny_batch(n=6, seed=0):
    """n images (n, 36, 20), n captions (n, 9) of lengths 1..9, float64 images."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5, 8, 3][:n])
    return (torch.randn(n, 36, 20, generator=gen, dtype=torch.float64),
            torch.randint(1, 50, (n, 9), generator=gen), lengths)


def double_model(module_name, **changes):
    """A float64 model in training mode, dropout off; PCME with a = b = 5, where its probabilities are
    neither 0 nor 1 (at PCME's initial a = b = 30 these random pairs score about 1e-5)."""
    torch.manual_seed(0)
    model = dropout_off(SimilarityModel(embedding_opt(module_name, **changes)).double())
    if module_name == "PCME":
        with torch.no_grad():
            model.sim_enc.log_scale.fill_(math.log(5.0))
            model.sim_enc.shift.fill_(5.0)
    return model


def pooled(local, length, how):
    """One item's pooled vector over its first `length` positions, l2-normalised (a plain restatement)."""
    real = local[:length]
    vector = real.mean(0) if how == "mean" else real.max(0).values
    return vector / (vector.norm() + 1e-8)


def vse_scores_loop(model, images, captions, lengths, how):
    regions, words = model.img_enc(images), model.txt_enc(captions, lengths)
    v = [pooled(regions[i], 36, how) for i in range(len(images))]
    t = [pooled(words[j], int(lengths[j]), how) for j in range(len(captions))]
    return torch.stack([torch.stack([torch.dot(v[i], t[j]) for j in range(len(t))]) for i in range(len(v))])


def hinge_loop(S, margin=0.2):
    """VSE++ hardest-negative hinge, one query at a time."""
    n = len(S)
    total = S.new_zeros(())
    for i in range(n):
        total = total + max((margin + S[i, j] - S[i, i]).clamp(min=0) for j in range(n) if j != i)
        total = total + max((margin + S[j, i] - S[i, i]).clamp(min=0) for j in range(n) if j != i)
    return total


def gaussian_loop(head, local, length):
    """PCME head of one item, restated: (mean, log-variance), each (d,)."""
    real = local[:length]
    mean_pool = real.mean(0)
    hidden = torch.tanh(real @ head.attention[0].weight.t() + head.attention[0].bias)
    weights = torch.softmax((hidden @ head.attention[2].weight.t()).squeeze(1) + head.attention[2].bias, 0)
    attended = (weights[:, None] * real).sum(0)
    logvar = head.fc.weight @ attended + head.fc.bias + head.fc2.weight @ mean_pool + head.fc2.bias
    return mean_pool / (mean_pool.norm() + 1e-8), logvar


def pcme_gaussians_loop(model, images, captions, lengths):
    regions, words = model.img_enc(images), model.txt_enc(captions, lengths)
    head = model.sim_enc
    return ([gaussian_loop(head.image_head, regions[i], 36) for i in range(len(images))],
            [gaussian_loop(head.caption_head, words[j], int(lengths[j])) for j in range(len(captions))])


def distance(a, b):
    """PCME's distance: sqrt(||a - b||^2 + 1e-6)."""
    return torch.sqrt((a - b).square().sum() + 1e-6)


def match_probability_loop(img_samples, cap_samples, scale, shift):
    """S[i, j] = mean over sample pairs of sigmoid(-a ||z_i - z_j|| + b), one pair of samples at a time."""
    rows = []
    for zi in img_samples:
        rows.append(torch.stack([torch.stack([torch.sigmoid(-scale * distance(a, b) + shift)
                                              for a in zi for b in zj]).mean() for zj in cap_samples]))
    return torch.stack(rows)


def samples_loop(gaussians, noise):
    """Each item's samples mean + sigma * eps from its noise eps (K, d)."""
    return [mean + torch.exp(logvar / 2) * eps for (mean, logvar), eps in zip(gaussians, noise)]


def model_noise(n, k, d):
    """The noise PCMEHead draws after the generator was seeded: images' (n, K, d), then captions'."""
    return torch.randn(n, k, d, dtype=torch.float64), torch.randn(n, k, d, dtype=torch.float64)


def daa_terms_direct(S, M, weight):
    """DAA's i2t and t2i terms in the original's direct form (reference indexing)."""
    return (weight * (1 - asp_soft_direct(S, M, TEMP, "reference")),
            weight * (1 - asp_soft_direct(S.t(), M.t(), TEMP, "reference")))


# ------------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize("how", ["mean", "max"])
def test_vse_scores_are_the_cosines_of_the_pooled_vectors(how):
    model = double_model("VSE", vse_pool=how).eval()
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        fast = model.similarity(model.encode_images(images), model.encode_captions(captions, lengths), lengths)
        torch.testing.assert_close(model(images, captions, lengths), fast)
        torch.testing.assert_close(fast, vse_scores_loop(model, images, captions, lengths, how))


def test_pcme_match_probability_equals_the_sampled_restatement():
    """Training mode: the model's S is the mean over K x K sample pairs, from the same noise; eval mode:
    the means' sigmoid(-a ||mu_i - mu_j|| + b)."""
    model = double_model("PCME", pcme_samples=3)
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        torch.manual_seed(5)
        batch = model(images, captions, lengths)
        torch.manual_seed(5)
        img_noise, cap_noise = model_noise(6, 3, 32)
        img_g, cap_g = pcme_gaussians_loop(model, images, captions, lengths)
        scale, shift = model.sim_enc.log_scale.exp(), model.sim_enc.shift
        expected = match_probability_loop(samples_loop(img_g, img_noise), samples_loop(cap_g, cap_noise), scale, shift)
        torch.testing.assert_close(batch.sims, expected, rtol=1e-6, atol=1e-12)
        assert 0.01 < float(expected.min()) and float(expected.max()) < 0.99  # no saturated, trivial case
        model.eval()
        means = model.similarity(model.encode_images(images), model.encode_captions(captions, lengths), lengths)
        expected = torch.stack([torch.stack([torch.sigmoid(-scale * distance(mi, mj) + shift) for mj, _ in cap_g])
                                for mi, _ in img_g])
        torch.testing.assert_close(means, expected, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# One training step: the loss and every gradient


def check_step(module_name, options, restated_losses, **changes):
    """train.compute_losses on one batch (DAA weight 3) against `restated_losses`(model, images, captions,
    lengths, relevance) -> the same dict: every term, and every parameter's gradient of the total."""
    model = double_model(module_name, **changes)
    criterion = train.build_criterion(opts.parse_opt(["--module_name", module_name, "--daa_weight", "3",
                                                      "--daa_temp", str(TEMP), *options]))
    images, captions, lengths = tiny_batch()
    relevance = torch.rand(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(3)  # PCME: the restatement draws the noise the model drew
    losses = train.compute_losses(model, criterion, images, captions, lengths, relevance, max_violation=True)
    torch.manual_seed(3)
    expected = restated_losses(model, images, captions, lengths, relevance)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=1e-9, msg=name)
    assert min(float(expected["daa_i2t_loss"].detach()), float(expected["daa_t2i_loss"].detach())) > 0.1
    parameters = list(model.named_parameters())
    fast = torch.autograd.grad(losses["loss"], [p for _, p in parameters])
    slow = torch.autograd.grad(expected["loss"], [p for _, p in parameters])
    for (name, _), g_fast, g_slow in zip(parameters, fast, slow):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-9, msg=name)
        assert float(g_fast.abs().max()) > 0, name


def test_vse_step_loss_and_gradients_equal_the_restatement():
    def restated(model, images, captions, lengths, relevance):
        S = vse_scores_loop(model, images, captions, lengths, "mean")
        hinge = hinge_loop(S)
        i2t, t2i = daa_terms_direct(S, relevance, 3.0)
        return {"loss": hinge + i2t + t2i, "contrastive_loss": hinge, "daa_i2t_loss": i2t, "daa_t2i_loss": t2i}

    check_step("VSE", [], restated)
    assert list(double_model("VSE").sim_enc.parameters()) == []  # VSE's head pools, it learns nothing itself


def test_pcme_step_loss_and_gradients_equal_the_restatement():
    def restated(model, images, captions, lengths, relevance):
        img_g, cap_g = pcme_gaussians_loop(model, images, captions, lengths)
        img_noise, cap_noise = model_noise(6, 2, 32)
        S = match_probability_loop(samples_loop(img_g, img_noise), samples_loop(cap_g, cap_noise),
                                   model.sim_enc.log_scale.exp(), model.sim_enc.shift)
        n = len(S)

        def nll(i, j):  # -log p(match = [i == j])
            return -torch.log(S[i, j]) if i == j else -torch.log(1 - S[i, j])

        # PCME's NLL over each image's row (i2t) and each caption's column (t2i): the same pairs twice
        i2t_nll = sum(nll(i, j) for i in range(n) for j in range(n))
        t2i_nll = sum(nll(i, j) for j in range(n) for i in range(n))
        vib = 0.01 * sum(0.5 * (lv.exp() + mu.square() - 1 - lv).sum() for mu, lv in img_g + cap_g)
        i2t, t2i = daa_terms_direct(S, relevance, 3.0)
        return {"loss": i2t_nll + t2i_nll + vib + i2t + t2i, "contrastive_loss": i2t_nll + t2i_nll,
                "vib_loss": vib, "daa_i2t_loss": i2t, "daa_t2i_loss": t2i}

    check_step("PCME", ["--pcme_samples", "2", "--pcme_vib_weight", "0.01"], restated,
               pcme_samples=2, pcme_vib_weight=0.01)


def test_pcme_loss_stays_finite_where_the_probabilities_underflow():
    """At PCME's initial scale a far pair's probability is 0 in fp32; its loss is taken in log space."""
    from pcme_loss import soft_contrastive_loss

    logits = torch.full((2, 2, 1, 1), -200.0, requires_grad=True)
    loss = soft_contrastive_loss(logits)
    assert math.isclose(float(loss.detach()), 2 * 2 * 200.0, rel_tol=1e-6)  # -log sigmoid(-200) = 200 per positive
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and float(grad[0, 0]) == pytest.approx(-2.0)


# ------------------------------------------------------------------------------------------------
# Runs, checkpoints, refusals


def run_argv(synth, short, out, module_name, *extra):
    return train_argv(synth, out, dims=TINY_DIMS, data_path=short) + [
        "--module_name", module_name, "--batch_size", "20", "--num_epochs", "1", "--daa_weight", "1", *extra]


@pytest.fixture(scope="module")
def vse_run(synth, short, tmp_path_factory):
    out = tmp_path_factory.mktemp("vse")
    assert errors.run(train.main, run_argv(synth, short, out, "VSE", "--vse_pool", "max")) == 0
    return out


@pytest.fixture(scope="module")
def pcme_run(synth, short, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcme")
    assert errors.run(train.main, run_argv(synth, short, out, "PCME", "--pcme_samples", "2",
                                           "--accum_steps", "2")) == 0
    return out


def test_checkpoints_record_the_module_and_rebuild_it(vse_run, pcme_run):
    for run, module_name, head_keys in ((vse_run, "VSE", set()), (pcme_run, "PCME", {"log_scale", "shift"})):
        path = str(run / "run" / "checkpoint_0.pth.tar")
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["opt"].module_name == module_name and len(ckpt["model"]) == 3
        assert all(key.startswith("module.") for part in ckpt["model"] for key in part)
        model = SimilarityModel.from_checkpoint(ckpt, path)
        assert model.embedding and model.module_name == module_name and not model.training
        assert head_keys <= {key.split(".", 1)[1] for key in ckpt["model"][2]}
    assert checkpoint.load_checkpoint(str(vse_run / "run" / "checkpoint_0.pth.tar"))["opt"].vse_pool == "max"


@pytest.mark.parametrize("extra, message", [
    (["--module_name", "SAF", "--pcme_samples", "3"], "--pcme_samples is a PCME option, but this run trains an SAF "
                                                      "model"),
    (["--module_name", "PCME", "--vse_pool", "max"], "--vse_pool is a VSE option, but this run trains a PCME model"),
    (["--module_name", "SGR", "--pcme_vib_weight", "0.1"], "--pcme_vib_weight is a PCME option"),
    (["--module_name", "PCME", "--pcme_samples", "0"], "--pcme_samples must be at least 1"),
])
def test_an_option_of_another_module_is_refused(synth, short, tmp_path, capsys, extra, message):
    argv = train_argv(synth, tmp_path, dims=TINY_DIMS, data_path=short) + extra
    assert errors.run(train.main, argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "log")


@pytest.mark.parametrize("extra, message", [
    (["--module_name", "SGR"], "--module_name: "),
    (["--vse_pool", "mean"], "--vse_pool: "),
    (["--pcme_samples", "3"], "--pcme_samples is a PCME option, but this run trains a VSE model"),
])
def test_resume_cannot_change_the_module_or_its_meaning(vse_run, tmp_path, capsys, extra, message):
    before = sorted(os.listdir(vse_run / "run"))
    argv = ["--resume", str(vse_run / "run"), "--num_epochs", "2", "--model_name", str(tmp_path / "branch"), *extra]
    assert errors.run(train.main, argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(vse_run / "run")) == before and not os.path.exists(tmp_path / "branch")


def test_resume_continues_an_embedding_run(pcme_run, tmp_path):
    argv = ["--resume", str(pcme_run / "run"), "--num_epochs", "2", "--model_name", str(tmp_path / "branch"),
            "--logger_name", str(tmp_path / "log")]
    assert errors.run(train.main, argv) == 0
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "branch" / "checkpoint_1.pth.tar"))
    assert ckpt["epoch"] == 2 and ckpt["opt"].module_name == "PCME" and ckpt["opt"].pcme_samples == 2


# ------------------------------------------------------------------------------------------------
# Evaluation


def per_pair_matrix(model, dataset):
    """Every (image, caption) pair scored on its own: each item encoded alone, then model.similarity."""
    with torch.no_grad():
        images = [model.encode_images(torch.from_numpy(np.asarray(dataset.features[i]))[None])
                  for i in range(dataset.n_images)]
        captions = []
        for j in range(dataset.n_captions):
            tokens = torch.as_tensor(dataset[j][1])[None]
            captions.append((model.encode_captions(tokens, torch.tensor([tokens.shape[1]])), tokens.shape[1]))
        return np.array([[float(model.similarity(v, t, torch.tensor([n]))) for t, n in captions] for v in images],
                        dtype=np.float32)


@pytest.mark.parametrize("run_name", ["vse_run", "pcme_run"])
def test_evaluation_scores_the_matrix_of_the_per_pair_path(run_name, synth, tmp_path, request):
    path = str(request.getfixturevalue(run_name) / "run" / "model_best.pth.tar")
    sims_file, json_file = str(tmp_path / "s.npy"), str(tmp_path / "r.json")
    report = scores(path, synth, "test", "--save_sims", sims_file, "--json", json_file, "--shard_size", "7")
    ckpt = checkpoint.load_checkpoint(path)
    model = SimilarityModel.from_checkpoint(ckpt, path)
    vocab = evaluation.vocab_lib.vocab_from_word2idx(ckpt["vocab"], "the checkpoint's vocabulary")
    _, _, dataset = data.get_eval_loaders(synth.data_path, "f30k_precomp", "test", vocab, 16, 0)
    expected = per_pair_matrix(model, dataset)
    # Items encoded in batches and alone differ in the last bits; PCME's logit -a d + b multiplies those of
    # the distance by a (30 at the start), and its probabilities at a = b = 30 are mostly far below 2e-6 a,
    # so its tolerance is relative (d sigmoid(x) / sigmoid(x) = (1 - sigmoid(x)) dx <= a dd) and scales with a.
    if run_name == "pcme_run":
        scale = model.sim_enc.log_scale.exp().item()
        np.testing.assert_allclose(np.load(sims_file), expected, rtol=2e-6 * scale, atol=0)
    else:
        np.testing.assert_allclose(np.load(sims_file), expected, rtol=0, atol=2e-6)
    assert report["rsum"] == evaluation.score_matrix(np.load(sims_file), dataset.relevance.matrix())["rsum"]
    written = json.load(open(json_file))
    if run_name == "pcme_run":
        assert written["pcme_scoring"] == evaluation.PCME_SCORING
    else:
        assert "pcme_scoring" not in written


def test_ensembles_pair_two_different_modules(vse_run, pcme_run, synth, tmp_path, capsys):
    vse, pcme = (str(run / "run" / "model_best.pth.tar") for run in (vse_run, pcme_run))
    pair = scores(vse, synth, "test", "--model_path2", pcme, "--save_sims", str(tmp_path / "pair.npy"))
    alone = [scores(path, synth, "test", "--save_sims", str(tmp_path / f"{k}.npy")) for k, path in enumerate((vse, pcme))]
    mean = (np.load(tmp_path / "0.npy") + np.load(tmp_path / "1.npy")) / 2
    np.testing.assert_allclose(np.load(tmp_path / "pair.npy"), mean, rtol=0, atol=1e-7)
    assert alone and pair["pcme_scoring"] == evaluation.PCME_SCORING
    capsys.readouterr()
    assert errors.run(evaluation.main, ["--model_path", vse, "--model_path2", vse, "--device", "cpu"]) != 0
    assert "a VSE model like" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Slow: learning, DDP


@pytest.mark.slow
@pytest.mark.parametrize("module_name, extra", [("VSE", []), ("PCME", []), ("VSE", ["--vse_pool", "gpo"]),
                                                ("PCMEpp", [])])
def test_embedding_models_learn_with_daa(module_name, extra, synth, tmp_path):
    run = LEARNING_RUN
    if module_name != "VSE":  # no hinge to warm up: train.py refuses --warmup_epochs on PCME and PCMEpp
        at = run.index("--warmup_epochs")
        run = run[:at] + run[at + 2:]
    argv = train_argv(synth, tmp_path, dims=SMALL_DIMS) + run + ["--module_name", module_name, *extra]
    assert errors.run(train.main, argv) == 0
    report = scores(str(tmp_path / "run" / "model_best.pth.tar"), synth, "test")
    print(module_name, *extra, "test R@10 i2t %.1f t2i %.1f" % (report["i2t"]["r10"], report["t2i"]["r10"]))
    # chance R@10: t2i 10 of 40 images = 25 %; i2t, 5 own captions among 200, about 23 %
    assert report["i2t"]["r10"] >= 55.0 and report["t2i"]["r10"] >= 55.0


@pytest.mark.slow
@pytest.mark.parametrize("module_name", ["VSE", "PCMEpp"])
def test_two_gloo_processes_train_an_embedding_model(module_name, synth, short, tmp_path):
    argv = run_argv(synth, short, tmp_path, module_name, "--world_size", "2", "--batch_size", "10")
    assert errors.run(train.main, argv) == 0
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint_0.pth.tar"))
    assert ckpt["opt"].world_size == 2 and ckpt["Eiters"] == 200 // 2 // 10
    dev = scores(str(tmp_path / "run" / "model_best.pth.tar"), synth, "dev")
    assert ckpt["best_rsum"] == pytest.approx(dev["rsum"], abs=1e-6)
