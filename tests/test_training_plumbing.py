"""The plumbing of train.py's loop, each checked against a computation of its own:

- gradient accumulation: the gradient of a step of K micro-batches is the mean of the K micro-batches'
  gradients (a run that zeroes its gradients every batch, at learning rate 0 so the weights stay put),
  and the gradient of one backward pass through the K micro-batches' losses in one graph;
- --init_from: the weights come from the checkpoint; the optimizer state, epoch, iteration count and
  random generators do not;
- the original's model options --no_bi_gru, --num_layers 2, --no_imgnorm, --no_txtnorm: each model is
  built from the command line and its scores equal a restatement (encoders written out caption by caption,
  the similarity by the original's caption loop).
"""
import copy

import pytest
import torch

import errors
import opts
import train
from daa_loss import DAALoss
from model import SimilarityModel
from tests.test_train import load, short, short_argv  # noqa: F401 (short: the module's fixture)
from tools.baselines.sim_loop import sim_one_caption_at_a_time

K = 3  # micro-batches per step
RUN = ["--batch_size", "20", "--num_epochs", "1", "--val_images", "5", "--daa_weight", "1", "--warmup_epochs", "0"]


def observe(monkeypatch, steps):
    """Record, while train.main runs here: the inputs of the first K loss calls, the weights, buffers and RNG
    state before the first, and the gradients (before clipping) and Adam's state entries at each of the
    first `steps` optimizer steps."""
    seen = {"batches": [], "grads": [], "optimizer_state": []}
    compute, step = train.compute_losses, train.optimizer_step

    def compute_losses(model, criterion, images, captions, lengths, relevance, max_violation, amp_dtype=None,
                       image_ids=None):
        if not seen["batches"]:
            seen["weights"] = copy.deepcopy(train.unwrap(model).state_dicts())
            seen["rng"] = torch.get_rng_state()
        if len(seen["batches"]) < K:
            seen["batches"].append((images, captions, lengths, relevance, max_violation))
        return compute(model, criterion, images, captions, lengths, relevance, max_violation, amp_dtype, image_ids)

    def optimizer_step(model, optimizer, scaler, grad_clip):
        if len(seen["grads"]) < steps:
            seen["grads"].append({name: p.grad.clone() for name, p in model.named_parameters()})
            seen["optimizer_state"].append(len(optimizer.state))
        return step(model, optimizer, scaler, grad_clip)

    monkeypatch.setattr(train, "compute_losses", compute_losses)
    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    return seen


def run(monkeypatch, argv, steps=1):
    with monkeypatch.context() as patch:
        seen = observe(patch, steps)
        assert errors.run(train.main, argv) == 0
    return seen


def assert_same_gradients(a, b):
    """Equal up to float sums in another order: each tensor to 1e-5 of its largest entry, and every entry to
    1e-7 of the largest of all (the noise floor: gradients that are 0 in exact arithmetic, as those of a bias
    before BatchNorm or of a softmax's shift, come out as rounding noise of either sign)."""
    assert a.keys() == b.keys()
    floor = 1e-7 * max(float(g.abs().max()) for g in b.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=max(1e-5 * float(b[name].abs().max()), floor),
                                   msg=name)


def test_accumulated_gradients(synth, short, tmp_path, monkeypatch):  # noqa: F811
    """A step of K micro-batches carries the mean of their gradients.

    Learning rate 0 keeps the weights fixed, so a run that zeroes its gradients every batch (--accum_steps 1)
    sees the same weights, batches and dropout draws (the same generator calls in the same order) as the
    accumulating run; BatchNorm takes each micro-batch's statistics in both. Then one backward pass through
    the mean of the K micro-batches' losses, from the recorded weights, inputs and generator state.
    """
    base = short_argv(synth, short, tmp_path / "a") + RUN + ["--learning_rate", "0"]
    accumulated = run(monkeypatch, base + ["--accum_steps", str(K)])
    every_batch = run(monkeypatch, short_argv(synth, short, tmp_path / "b") + RUN + ["--learning_rate", "0"], steps=K)
    mean = {name: sum(g[name] for g in every_batch["grads"]) / K for name in every_batch["grads"][0]}
    assert_same_gradients(accumulated["grads"][0], mean)
    assert not all(torch.equal(every_batch["grads"][0][n], every_batch["grads"][1][n]) for n in mean)  # K batches differ

    opt = opts.parse_opt(base)
    opt.vocab_size = accumulated["weights"][1]["embed.weight"].shape[0]
    model = SimilarityModel(opt).train()
    model.load_state_dicts(accumulated["weights"], "the recorded weights")
    criterion = DAALoss(opt.margin, opt.max_violation, opt.daa_weight, opt.daa_temp, opt.daa_variant)
    torch.set_rng_state(accumulated["rng"])
    total = sum(criterion(model(images, captions, lengths), relevance, max_violation=max_violation)["loss"]
                for images, captions, lengths, relevance, max_violation in accumulated["batches"])
    (total / K).backward()
    assert_same_gradients(accumulated["grads"][0], {name: p.grad for name, p in model.named_parameters()})


def test_init_from_takes_the_weights_only(synth, short, tmp_path, monkeypatch):  # noqa: F811
    """--init_from CKPT: training starts from CKPT's weights (buffers included), with a fresh Adam, at epoch 0
    and iteration 0, and with the generator a new run of the seed has, not CKPT's."""
    assert errors.run(train.main, short_argv(synth, short, tmp_path / "first") + RUN) == 0
    ckpt_path = tmp_path / "first" / "run" / "checkpoint_0.pth.tar"
    ckpt = load(ckpt_path)
    assert ckpt["optimizer"]["state"] and ckpt["Eiters"] == 10

    seen = run(monkeypatch, short_argv(synth, short, tmp_path / "second") + RUN + ["--init_from", str(ckpt_path)])
    for started, saved in zip(seen["weights"], ckpt["model"]):
        saved = {key[len("module."):]: value for key, value in saved.items()}
        assert started.keys() == saved.keys() and all(torch.equal(started[k], saved[k]) for k in saved)
    assert seen["optimizer_state"][0] == 0
    torch.manual_seed(0 + 1)  # a new run's dropout seed: --seed + 1 + rank
    assert torch.equal(seen["rng"], torch.get_rng_state()) and not torch.equal(seen["rng"], ckpt["rng"]["torch"])
    new = load(tmp_path / "second" / "run" / "checkpoint_0.pth.tar")
    assert new["epoch"] == 1 and new["Eiters"] == 10 and new["opt"].init_from == str(ckpt_path)


def restated_scores(model, opt, images, captions, lengths):
    """The model's eval-mode scores (n_images, n_captions) restated: the image encoder's fc with or without
    the l2 norm; each caption's real words alone through the GRU (no packing, no padding), its directions
    averaged when bidirectional, with or without the l2 norm; then the original's caption loop."""
    def l2(x):
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)

    with torch.no_grad():
        regions = torch.nn.functional.linear(images, model.img_enc.fc.weight, model.img_enc.fc.bias)
        regions = regions if opt.no_imgnorm else l2(regions)
        words = torch.zeros(len(lengths), captions.shape[1], opt.embed_size)
        for row, n in enumerate(lengths.tolist()):
            out, _ = model.txt_enc.cap_rnn(model.txt_enc.embed.weight[captions[row, :n]].unsqueeze(0))
            out = out[0]
            if opt.bi_gru:
                out = (out[:, :opt.embed_size] + out[:, opt.embed_size:]) / 2
            words[row, :n] = out if opt.no_txtnorm else l2(out)
        return sim_one_caption_at_a_time(model.sim_enc, regions, words, lengths)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
@pytest.mark.parametrize("flags", [[], ["--no_bi_gru"], ["--bi_gru"], ["--num_layers", "2"], ["--no_imgnorm"],
                                   ["--no_txtnorm"], ["--no_bi_gru", "--num_layers", "2", "--no_imgnorm", "--no_txtnorm"]])
def test_model_options_against_a_restatement(module_name, flags):
    opt = opts.parse_opt(["--module_name", module_name, "--img_dim", "20", "--word_dim", "12", "--embed_size", "16",
                          "--sim_dim", "8"] + flags)
    opt.vocab_size = 50
    assert opt.bi_gru == ("--no_bi_gru" not in flags and "--bi_gru" not in flags)  # the original's store_false
    torch.manual_seed(0)
    model = SimilarityModel(opt).eval()
    gru = model.txt_enc.cap_rnn
    assert (gru.bidirectional, gru.num_layers) == (opt.bi_gru, int(opt.num_layers))
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 36, 20, generator=gen) * 3  # norms far from 1: the norms' absence shows
    lengths = torch.tensor([6, 2, 5, 3, 6])
    captions = torch.randint(4, 50, (5, 6), generator=gen) * (torch.arange(6) < lengths[:, None])
    with torch.no_grad():
        got = model(images, captions, lengths)
    torch.testing.assert_close(got, restated_scores(model, opt, images, captions, lengths), rtol=1e-5, atol=1e-6)
