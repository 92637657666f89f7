"""The project against numbers produced by the ORIGINAL SGRAF/DAA code (tests/fixtures/README.md).

One batch of 8 captions through a tiny SGR and a tiny SAF built from the original's initial weights:
the TF-IDF and relevance block, the collated batch, eval-mode embeddings and similarities, the
training-mode loss terms (DAA weight 25, the released "reference" indexing, and weight 0), every
gradient, the BatchNorm statistics after the forward, and the weights after the project's own clipped
Adam step. Training mode has every Dropout off, as the fixture was made. Tolerances are the fixture's:
the spread of the original itself between 1 and 2 threads and float32 and float64.
"""
import argparse
import os

import numpy as np
import pytest
import torch

import daa_loss
import data
import train
import vocab as vocab_module
from model import SimilarityModel

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "original_sgraf_golden.npz")
PARTS = ("img_enc", "txt_enc", "sim_enc")
# Gradients that are mathematically ~0 (a bias before a training-mode BatchNorm or a softmax, and in SGR
# the last step's query and key, whose nodes are nearly identical at init): the stored values are
# float32 rounding noise, compared only through the whole-model bound.
NOISE = {"SGR": {"sim_enc/v_global_w.embedding_global.0.bias", "sim_enc/v_global_w.embedding_common.0.bias",
                 "sim_enc/t_global_w.embedding_common.0.bias", "sim_enc/SGR_module.0.graph_key_w.bias",
                 "sim_enc/SGR_module.1.graph_key_w.bias", "sim_enc/SGR_module.2.graph_key_w.bias",
                 "sim_enc/SGR_module.2.graph_query_w.weight", "sim_enc/SGR_module.2.graph_query_w.bias",
                 "sim_enc/SGR_module.2.graph_key_w.weight"},
         "SAF": {"sim_enc/v_global_w.embedding_global.0.bias", "sim_enc/v_global_w.embedding_common.0.bias",
                 "sim_enc/t_global_w.embedding_common.0.bias", "sim_enc/SAF_module.attn_sim_w.bias"}}
LOSS_KEYS = {"loss": "loss", "contrastive_loss": "contrastive_loss", "daa_i2t_loss": "DAA_i2t_loss",
             "daa_t2i_loss": "DAA_t2i_loss"}


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE, allow_pickle=False) as z:
        return {key: z[key] for key in z.files}


# The golden numbers were made with one thread; float sums depend on the thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


def golden_opt(g, module_name):
    return argparse.Namespace(
        img_dim=int(g["opt_img_dim"]), word_dim=int(g["opt_word_dim"]), embed_size=int(g["opt_embed_size"]),
        sim_dim=int(g["opt_sim_dim"]), num_layers=int(g["opt_num_layers"]), bi_gru=bool(g["opt_bi_gru"]),
        no_imgnorm=bool(g["opt_no_imgnorm"]), no_txtnorm=bool(g["opt_no_txtnorm"]), module_name=module_name,
        sgr_step=int(g["opt_sgr_step"]), vocab_size=int(g["opt_vocab_size"]))


def golden_model(g, module_name):
    """The project's model holding the original's initial weights (its key names are the original's)."""
    model = SimilarityModel(golden_opt(g, module_name))
    states = []
    for part in PARTS:
        prefix = f"{module_name}/{part}/"
        states.append({k[len(prefix):]: torch.from_numpy(v) for k, v in g.items() if k.startswith(prefix)})
    model.load_state_dicts(states, FIXTURE)  # strict: every key of the original, and no other
    return model


def golden_captions(g):
    """The corpus as text: caption r is its word numbers n written "wNN", image r // 5."""
    return [" ".join(f"w{n:02d}" for n in row[:k]) for row, k in zip(g["corpus/word_numbers"], g["corpus/n_tokens"])]


def golden_vocab():
    """<pad> <start> <end> <unk> = 0..3, then "wNN" -> NN for NN in 4..39 (40 and 41 are unknown)."""
    word2idx = {w: i for i, w in enumerate(("<pad>", "<start>", "<end>", "<unk>"))}
    word2idx.update({f"w{n:02d}": n for n in range(4, 40)})
    return vocab_module.vocab_from_word2idx(word2idx)


def batch_tensors(g):
    return (torch.from_numpy(g["batch/images"]), torch.from_numpy(g["batch/captions"]),
            torch.from_numpy(g["batch/lengths"]))


def parameters(model):
    """{"img_enc/fc.weight": parameter, ...}: the fixture's names for the model's parameters."""
    return {f"{part}/{name}": p for part in PARTS for name, p in getattr(model, part).named_parameters()}


# ------------------------------------------------------------------------------------------------
# Data: TF-IDF, relevance, captions, the collated batch


def test_tfidf_and_relevance_block(golden):
    g = golden
    relevance = daa_loss.SemanticRelevance(golden_captions(g))
    assert list(g["corpus/tfidf_col_word_number"]) == sorted(g["corpus/tfidf_col_word_number"])  # vocabulary order
    np.testing.assert_allclose(relevance.caption_rows.toarray(), g["corpus/tfidf"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(relevance.block(g["batch/img_ids"], g["batch/ids"]), g["batch/M"], rtol=0, atol=1e-6)


def test_captions_encode_and_collate_as_the_original(golden):
    """The draw-order items through the project's training collate give the original's sorted batch."""
    g = golden
    captions, vocab = golden_captions(g), golden_vocab()
    items = []
    for j, length, row in zip(g["batch/unsorted_ids"], g["batch/unsorted_lengths"], g["batch/unsorted_captions"]):
        encoded = vocab_module.encode_caption(vocab, captions[j])
        assert encoded == row[:length].tolist() and not row[length:].any()
        items.append((torch.from_numpy(g["corpus/feat"][j // 5]), torch.tensor(encoded), int(j), int(j // 5)))
    images, padded, lengths, caption_ids, image_ids, M = data.TrainCollate(daa_loss.SemanticRelevance(captions))(items)
    assert caption_ids.tolist() == g["batch/ids"].tolist() and image_ids.tolist() == g["batch/img_ids"].tolist()
    assert lengths.tolist() == g["batch/lengths"].tolist() and padded.tolist() == g["batch/captions"].tolist()
    np.testing.assert_array_equal(images.numpy(), g["batch/images"])
    np.testing.assert_allclose(M.numpy(), g["batch/M"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Eval mode


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_eval_embeddings_and_similarities(golden, module_name):
    g, P = golden, module_name
    model = golden_model(g, P).eval()
    images, captions, lengths = batch_tensors(g)
    with torch.no_grad():
        img_emb, cap_emb = model.encode_images(images), model.encode_captions(captions, lengths)
        S = model.similarity(img_emb, cap_emb, lengths)
    np.testing.assert_allclose(img_emb.numpy(), g[f"{P}/eval/img_emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(cap_emb.numpy(), g[f"{P}/eval/cap_emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(S.numpy(), g[f"{P}/eval/S"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training mode: loss terms, gradients, BatchNorm statistics, the clipped Adam step


def training_step(g, module_name, daa_weight, optimizer_class=None):
    """The project's training step on the golden batch: compute_losses, backward, optimizer_step.

    The optimizer is the original's Adam (lr from the fixture) unless `optimizer_class` is given.
    Returns (model after the step, training-mode S, the loss dict, the gradients before the step, the
    norm optimizer_step reports, the optimizer).
    """
    model = golden_model(g, module_name).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    sims = []
    model.register_forward_hook(lambda module, inputs, output: sims.append(output.detach().clone()))
    criterion = daa_loss.DAALoss(margin=float(g["opt_margin"]), max_violation=bool(g["opt_max_violation"]),
                                 daa_weight=daa_weight, daa_temp=float(g["opt_daa_temp"]), daa_variant="reference")
    optimizer = (optimizer_class or torch.optim.Adam)(model.parameters(), lr=float(g["opt_learning_rate"]))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = train.compute_losses(model, criterion, *batch_tensors(g), torch.from_numpy(g["batch/M"]),
                                  max_violation=True)
    losses["loss"].backward()
    grads = {name: p.grad.clone() for name, p in parameters(model).items()}
    norm = train.optimizer_step(model, optimizer, scaler, float(g["opt_grad_clip"]))
    return model, sims[0], losses, grads, norm, optimizer


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is handed: {parameter: gradient}."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.seen = {}

    def step(self, closure=None):
        self.seen = {p: p.grad.clone() for group in self.param_groups for p in group["params"]}


def assert_gradients_match(grads, g, prefix, noise):
    """The fixture's two measures: max |diff| within 3e-4 of the model's largest gradient, and per tensor
    (noise tensors excepted) within 1e-3 of the tensor's largest."""
    expected = {name: g[f"{prefix}/{name}"] for name in grads}
    assert len(expected) == len([k for k in g if k.startswith(prefix + "/")])  # every parameter, no other
    model_max = max(np.abs(e).max() for e in expected.values())
    for name, grad in grads.items():
        diff = np.abs(grad.numpy() - expected[name]).max()
        assert diff <= 3e-4 * model_max, (name, diff, model_max)
        if name not in noise:
            assert diff <= 1e-3 * np.abs(expected[name]).max(), (name, diff, np.abs(expected[name]).max())


@pytest.mark.parametrize("module_name,daa_weight", [("SGR", 25), ("SAF", 25), ("SGR", 0), ("SAF", 0)])
def test_training_losses_and_gradients(golden, module_name, daa_weight):
    g, P = golden, module_name
    stored = f"{P}/train" if daa_weight else f"{P}/w0/train"
    _, S, losses, grads, norm, _ = training_step(g, P, daa_weight)
    np.testing.assert_allclose(S.numpy(), g[f"{P}/train/S"], rtol=0, atol=1e-6)
    for ours, theirs in LOSS_KEYS.items():
        assert losses[ours].item() == pytest.approx(float(g[f"{stored}/{theirs}"]), rel=1e-5, abs=1e-6), ours
    assert float(norm) == pytest.approx(float(g[f"{stored}/grad_norm"]), rel=1e-4)
    assert_gradients_match(grads, g, f"{P}/grad" if daa_weight else f"{P}/w0/grad", NOISE[P])


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_batchnorm_statistics_after_the_forward(golden, module_name):
    """VisualSA's BatchNorms updated once; SAF's gate BatchNorm once per caption, in caption order."""
    g, P = golden, module_name
    model = training_step(g, P, 25)[0]
    buffers = dict(model.sim_enc.named_buffers())
    prefix = f"{P}/after_fwd/sim_enc/"
    stored = {k[len(prefix):]: v for k, v in g.items() if k.startswith(prefix)}
    assert set(stored) == set(buffers)
    for name, value in stored.items():
        if name.endswith("num_batches_tracked"):
            assert int(buffers[name]) == int(value), name
        else:
            np.testing.assert_allclose(buffers[name].numpy(), value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_weights_after_one_clipped_adam_step(golden, module_name):
    g, P = golden, module_name
    model = training_step(g, P, 25)[0]
    lr, clip = float(g["opt_learning_rate"]), float(g["opt_grad_clip"])
    scale = min(1.0, clip / (float(g[f"{P}/train/grad_norm"]) + 1e-6))
    for name, value in parameters(model).items():
        expected = g[f"{P}/after_step/{name}"]
        diff = np.abs(value.detach().numpy() - expected)
        assert diff.max() <= 2 * lr, name  # Adam's first step moves every element by at most lr
        if name not in NOISE[P]:
            # elements with a gradient well above float32 noise: Adam's lr g / (|g| + eps) is exact there
            firm = np.abs(g[f"{P}/grad/{name}"]) * scale >= 1e-6
            assert diff[firm].max(initial=0) <= 1e-6, name
    model.eval()
    with torch.no_grad():
        S = model(*batch_tensors(g))
    np.testing.assert_allclose(S.numpy(), g[f"{P}/eval_after_step/S"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_optimizer_step_clips_the_golden_gradient_to_norm_2(golden, module_name):
    """What the optimizer is handed is the original's gradient times 2 / (||g|| + 1e-6)."""
    g, P = golden, module_name
    model, _, _, _, _, recorder = training_step(g, P, 25, GradientRecorder)
    clip = float(g["opt_grad_clip"])
    scale = clip / (float(g[f"{P}/train/grad_norm"]) + 1e-6)
    clipped = {name: recorder.seen[p] for name, p in parameters(model).items()}
    assert float(torch.sqrt(sum((c.double() ** 2).sum() for c in clipped.values()))) == pytest.approx(clip, rel=1e-5)
    assert_gradients_match({name: c / scale for name, c in clipped.items()}, g, f"{P}/grad", NOISE[P])
