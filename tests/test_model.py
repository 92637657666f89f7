"""SimilarityModel: checkpoint layout, batched scores against the original caption-by-caption loop
(eval and training mode, BatchNorm running stats, gradients), masking of padded words, initialisation."""
import argparse
import copy
import math
import re

import pytest
import torch

from tools.baselines.sim_loop import sim_one_caption_at_a_time
from model import SimilarityModel, _LocalAlignment

# The released checkpoints' keys (after DDP's 'module.' is stripped) and shapes, from
# shared/reference/checkpoint_layout.txt (vocab 10000, img 2048, embed 1024, word 300, sim 256, 3 SGR steps).
COMMON_LAYOUT = """
img_enc fc.weight (1024, 2048)
img_enc fc.bias (1024,)
txt_enc embed.weight (10000, 300)
txt_enc cap_rnn.weight_ih_l0 (3072, 300)
txt_enc cap_rnn.weight_hh_l0 (3072, 1024)
txt_enc cap_rnn.bias_ih_l0 (3072,)
txt_enc cap_rnn.bias_hh_l0 (3072,)
txt_enc cap_rnn.weight_ih_l0_reverse (3072, 300)
txt_enc cap_rnn.weight_hh_l0_reverse (3072, 1024)
txt_enc cap_rnn.bias_ih_l0_reverse (3072,)
txt_enc cap_rnn.bias_hh_l0_reverse (3072,)
sim_enc v_global_w.embedding_local.0.weight (1024, 1024)
sim_enc v_global_w.embedding_local.0.bias (1024,)
sim_enc v_global_w.embedding_local.1.weight (36,)
sim_enc v_global_w.embedding_local.1.bias (36,)
sim_enc v_global_w.embedding_local.1.running_mean (36,)
sim_enc v_global_w.embedding_local.1.running_var (36,)
sim_enc v_global_w.embedding_local.1.num_batches_tracked ()
sim_enc v_global_w.embedding_global.0.weight (1024, 1024)
sim_enc v_global_w.embedding_global.0.bias (1024,)
sim_enc v_global_w.embedding_global.1.weight (1024,)
sim_enc v_global_w.embedding_global.1.bias (1024,)
sim_enc v_global_w.embedding_global.1.running_mean (1024,)
sim_enc v_global_w.embedding_global.1.running_var (1024,)
sim_enc v_global_w.embedding_global.1.num_batches_tracked ()
sim_enc v_global_w.embedding_common.0.weight (1, 1024)
sim_enc v_global_w.embedding_common.0.bias (1,)
sim_enc t_global_w.embedding_local.0.weight (1024, 1024)
sim_enc t_global_w.embedding_local.0.bias (1024,)
sim_enc t_global_w.embedding_global.0.weight (1024, 1024)
sim_enc t_global_w.embedding_global.0.bias (1024,)
sim_enc t_global_w.embedding_common.0.weight (1, 1024)
sim_enc t_global_w.embedding_common.0.bias (1,)
sim_enc sim_tranloc_w.weight (256, 1024)
sim_enc sim_tranloc_w.bias (256,)
sim_enc sim_tranglo_w.weight (256, 1024)
sim_enc sim_tranglo_w.bias (256,)
sim_enc sim_eval_w.weight (1, 256)
sim_enc sim_eval_w.bias (1,)
"""
SGR_LAYOUT = "".join(f"sim_enc SGR_module.{i}.{name}.{kind} {shape}\n" for i in range(3)
                     for name in ("graph_query_w", "graph_key_w", "sim_graph_w")
                     for kind, shape in (("weight", "(256, 256)"), ("bias", "(256,)")))
SAF_LAYOUT = """
sim_enc SAF_module.attn_sim_w.weight (1, 256)
sim_enc SAF_module.attn_sim_w.bias (1,)
sim_enc SAF_module.bn.weight (1,)
sim_enc SAF_module.bn.bias (1,)
sim_enc SAF_module.bn.running_mean (1,)
sim_enc SAF_module.bn.running_var (1,)
sim_enc SAF_module.bn.num_batches_tracked ()
"""
LAYOUT_FLOATS = {"SGR": 18566995, "SAF": 17975128}


def make_opt(module_name, **changes):
    opt = argparse.Namespace(img_dim=20, word_dim=12, embed_size=32, sim_dim=16, num_layers=1, bi_gru=True,
                             no_imgnorm=False, no_txtnorm=False, module_name=module_name, sgr_step=3,
                             vocab_size=50)
    vars(opt).update(changes)
    return opt


def parse_layout(text):
    """{module: {key: shape}} from 'module key (shape)' lines."""
    layout = {"img_enc": {}, "txt_enc": {}, "sim_enc": {}}
    for line in filter(None, map(str.strip, text.splitlines())):
        module, key, shape = re.match(r"(\S+) (\S+) \((.*)\)", line).groups()
        layout[module][key] = tuple(int(x) for x in shape.split(",") if x.strip())
    return layout


def batch(n_images=5, lengths=(7, 3, 9, 2, 5, 9, 4), width=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 36, 20, generator=gen)
    captions = torch.randint(1, 50, (len(lengths), width), generator=gen)
    return images, captions, torch.tensor(lengths)


def embeddings(model, images, captions, lengths):
    with torch.no_grad():
        return model.encode_images(images), model.encode_captions(captions, lengths)


def dropout_off(model):
    """Training mode with every Dropout in eval, so batched and loop forwards are deterministic."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return model


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_parameters_match_the_released_checkpoint_layout(module_name):
    opt = make_opt(module_name, img_dim=2048, word_dim=300, embed_size=1024, sim_dim=256, vocab_size=10000)
    model = SimilarityModel(opt)
    expected = parse_layout(COMMON_LAYOUT + (SGR_LAYOUT if module_name == "SGR" else SAF_LAYOUT))
    floats = 0
    for name, state in zip(("img_enc", "txt_enc", "sim_enc"), model.state_dicts()):
        assert {k: tuple(v.shape) for k, v in state.items()} == expected[name]
        for key, value in state.items():
            assert value.dtype == (torch.int64 if key.endswith("num_batches_tracked") else torch.float32)
            floats += value.numel() if value.dtype == torch.float32 else 0
    assert floats == LAYOUT_FLOATS[module_name]
    # A DDP checkpoint (every key prefixed 'module.') loads into a fresh model.
    prefixed = [{f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in s.items()}
                for s in model.state_dicts()]
    other = SimilarityModel(opt)
    other.load_state_dicts(prefixed, "a DDP checkpoint")
    for state, loaded in zip(prefixed, other.state_dicts()):
        for key, value in loaded.items():
            assert torch.equal(value, state[f"module.{key}"])


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
@pytest.mark.parametrize("max_elements", [None, 5 * 32 * 9, 1])
def test_batched_scores_equal_the_caption_loop_in_eval(module_name, max_elements):
    torch.manual_seed(0)
    model = SimilarityModel(make_opt(module_name)).eval()
    if max_elements is not None:  # one caption per chunk / a few chunks / everything at once
        model.sim_enc.max_elements = max_elements
    img_embs, cap_embs = embeddings(model, *batch()[:2], batch()[2])
    lengths = batch()[2]
    with torch.no_grad():
        fast = model.similarity(img_embs, cap_embs, lengths)
        slow = sim_one_caption_at_a_time(model.sim_enc, img_embs, cap_embs, lengths)
    assert fast.shape == (5, 7)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_a_caption_scores_the_same_in_any_batch_and_padding_is_ignored(module_name):
    torch.manual_seed(1)
    model = SimilarityModel(make_opt(module_name)).eval()
    images, captions, lengths = batch()
    with torch.no_grad():
        full = model(images, captions, lengths)
        alone = model(images, captions[1:2, :3], lengths[1:2])  # the 3-word caption with no padding at all
        junk = captions.clone()
        junk[torch.arange(11) >= lengths[:, None]] = 7  # other words where the padding was
        shuffled = torch.tensor([6, 0, 3, 1, 5, 2, 4])
        mixed = model(images[[4, 2, 0]], junk[shuffled], lengths[shuffled])
        img_embs, cap_embs = embeddings(model, images, captions, lengths)
        noisy = cap_embs + 5 * (torch.arange(11) >= lengths[:, None]).unsqueeze(2)  # garbage padded words
        from_noisy = model.similarity(img_embs, noisy, lengths)
    torch.testing.assert_close(alone[:, 0], full[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed, full[[4, 2, 0]][:, shuffled], atol=1e-6, rtol=0)
    torch.testing.assert_close(from_noisy, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_saf_training_mode_matches_the_loop_batchnorm_included(momentum):
    torch.manual_seed(2)
    model = SimilarityModel(make_opt("SAF"))
    model.sim_enc.SAF_module.bn.momentum = momentum
    model.sim_enc.max_elements = 5 * 32 * 9  # several chunks: stats must still be applied in caption order
    with torch.no_grad():  # non-trivial starting statistics
        model.sim_enc.SAF_module.bn.running_mean.fill_(0.3)
        model.sim_enc.SAF_module.bn.running_var.fill_(2.0)
        model.sim_enc.SAF_module.bn.num_batches_tracked.fill_(4)
    reference = copy.deepcopy(model)
    dropout_off(model), dropout_off(reference)
    images, captions, lengths = batch()
    img_embs, cap_embs = embeddings(model, images, captions, lengths)
    fast = model.similarity(img_embs, cap_embs, lengths)
    slow = sim_one_caption_at_a_time(reference.sim_enc, img_embs, cap_embs, lengths)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for (name, ours), theirs in zip(model.sim_enc.named_buffers(), reference.sim_enc.buffers()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
    assert int(model.sim_enc.SAF_module.bn.num_batches_tracked) == 4 + 7
    assert int(model.sim_enc.v_global_w.embedding_local[1].num_batches_tracked) == 1  # once per forward
    assert int(model.sim_enc.v_global_w.embedding_global[1].num_batches_tracked) == 1


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_gradients_equal_the_loop(module_name):
    torch.manual_seed(3)
    model = dropout_off(SimilarityModel(make_opt(module_name)))
    model.sim_enc.max_elements = 5 * 32 * 9
    reference = copy.deepcopy(model)
    images, captions, lengths = batch()
    weights = torch.rand(5, 7)
    (model(images, captions, lengths) * weights).sum().backward()
    slow = sim_one_caption_at_a_time(reference.sim_enc, reference.encode_images(images),
                                     reference.encode_captions(captions, lengths), lengths)
    (slow * weights).sum().backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert ours.grad is not None, name
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_local_alignment_gradcheck():
    gen = torch.Generator().manual_seed(4)
    aT = torch.softmax(torch.randn(3, 4, 6, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    V = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_LocalAlignment.apply, (aT, V, w, weight, bias, False))  # False: training


@pytest.mark.parametrize("module_name", ["SGR", "SAF", "VSE", "PCME", "PCMEpp"])
def test_bf16_autocast_scores_in_fp32_near_the_fp32_model(module_name):
    """Under bf16 autocast the encoders and the similarity path run in bf16, the score head in fp32.

    The head is checked against itself recomputed in fp64 from what reached it (SGR/SAF: each chunk's
    vectors; embedding models: the encoded items): within 1e-5, where a bf16 head would be off by up to
    half its spacing (0.001-0.002 at these scores, 0.008 at PCMEpp's -CSD of about -2). The scores are
    within 0.01 (+1 % of |score|) of the fp32 model's (measured: 0.002-0.005, PCMEpp 0.017 at -2.5) and
    differ from them (bf16 did engage).
    """
    torch.manual_seed(0)
    model = SimilarityModel(make_opt(module_name, vse_pool="mean", pcme_samples=7)).eval()
    images, captions, lengths = batch()
    heads = []  # (input of the score head, its output)
    if model.embedding:
        head = copy.deepcopy(model.sim_enc).double()
    else:
        score = model.sim_enc._score
        model.sim_enc._score = lambda vectors: heads.append((vectors, score(vectors))) or heads[-1][1]
        weight, bias = (p.detach().double() for p in (model.sim_enc.sim_eval_w.weight, model.sim_enc.sim_eval_w.bias))
    with torch.no_grad():
        fp32 = model.similarity(*embeddings(model, images, captions, lengths), lengths)
        heads.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img_embs, cap_embs = embeddings(model, images, captions, lengths)
            bf16 = model.similarity(img_embs, cap_embs, lengths)
    assert bf16.dtype == torch.float32 and img_embs.dtype == torch.bfloat16
    if model.embedding:
        heads = [((img_embs, cap_embs), bf16)]
        expected = [head(img_embs.double(), cap_embs.double())]
    else:
        assert heads and all(vectors.dtype == torch.bfloat16 for vectors, _ in heads)
        expected = [torch.sigmoid(torch.nn.functional.linear(vectors.double(), weight, bias)).squeeze(-1)
                    for vectors, _ in heads]
    for (_, out), want in zip(heads, expected, strict=True):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(bf16, fp32, atol=0.01, rtol=0.01)
    assert not torch.equal(bf16, fp32)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_bf16_autocast_trains(module_name):
    """A training forward and backward under bf16 autocast: fp32 scores, a finite gradient for every parameter."""
    torch.manual_seed(0)
    model = SimilarityModel(make_opt(module_name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(*batch())
    assert scores.dtype == torch.float32
    scores.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_initialisation_and_padded_word_embeddings():
    model = SimilarityModel(make_opt("SAF", vocab_size=500))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 3 + 3 + 3 + 1  # fc, VisualSA, TextSA, loc/glo/eval, SAF gate
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
        bound = math.sqrt(6 / (m.in_features + m.out_features))
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
    embed = model.txt_enc.embed.weight
    assert embed.abs().max() <= 0.1 and embed.abs().max() > 0.09
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    images, captions, lengths = batch()
    cap_embs = model.eval().encode_captions(captions, lengths)
    assert cap_embs.shape == (7, 11, 32)
    assert torch.all(cap_embs[torch.arange(11) >= lengths[:, None]] == 0)
    assert model.encode_images(images).shape == (5, 36, 32)
