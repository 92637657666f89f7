"""tools.daa_diagnosis: each per-epoch measure against a computation of its own on the same batches."""
import itertools

import numpy as np
import pytest
import torch

import errors
import evaluation
import train
from checkpoint import load_checkpoint
from daa_loss import DAALoss, asp_soft
from model import SimilarityModel
from tests.test_train import TINY_DIMS, train_argv
from tools import daa_diagnosis
from vocab import deserialize_vocab


@pytest.fixture(scope="module")
def tiny_run(synth, tmp_path_factory, one_thread):
    """One epoch of SGR with DAA 25 reference on the session's COCO, tiny dims."""
    out = tmp_path_factory.mktemp("diagnosis")
    argv = train_argv(synth, out, "coco_precomp", TINY_DIMS) + [
        "--batch_size", "16", "--num_epochs", "1", "--daa_weight", "25", "--log_step", "100", "--threads", "1"]
    assert errors.run(train.main, argv) == 0
    return str(out / "run" / "checkpoint_0.pth.tar")


def test_measures_of_one_epoch_against_their_definitions(tiny_run, synth, monkeypatch):
    monkeypatch.setattr(daa_diagnosis, "N_BATCHES", 2)
    ckpt = load_checkpoint(tiny_run)
    vocab = deserialize_vocab(f"{synth.vocab_path}/coco_precomp_vocab.json")
    batches = daa_diagnosis.fixed_batches(ckpt["opt"], vocab)
    assert len(batches) == 2 and all(b[0].shape[0] == 16 for b in batches)
    got = daa_diagnosis.measure_epoch(tiny_run, batches, len(vocab))

    expected = {key: [] for key in got if key != "epoch"}
    for k, (images, captions, lengths, M) in enumerate(batches):
        def fresh_scores():
            model = SimilarityModel.from_checkpoint(load_checkpoint(tiny_run), tiny_run, len(vocab)).train()
            torch.manual_seed(1000 + k)  # the tool's dropout masks
            return model, model(images, captions, lengths)

        criterion = DAALoss(daa_weight=25, daa_variant="reference")
        norms = {}
        for term in ("contrastive_loss", "daa"):  # each gradient from a backward pass of its own
            model, S = fresh_scores()
            losses = criterion(S, M, max_violation=True)  # the one epoch ran its hardest negatives (no warm-up)
            loss = losses[term] if term == "contrastive_loss" else losses["daa_i2t_loss"] + losses["daa_t2i_loss"]
            loss.backward()
            norms[term] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        S = S.detach().double().numpy()
        B = S.shape[0]
        within = [abs(S[q, a] - S[q, c]) < 0.001 for q in range(B) for a, c in itertools.permutations(range(B), 2)]
        expected["score_std"].append(S.std(ddof=1))
        expected["share_within_tau"].append(np.mean(within))
        expected["hinge_grad_norm"].append(float(norms["contrastive_loss"].norm()))
        expected["daa_grad_norm"].append(float(norms["daa"].norm()))
        expected["grad_cosine"].append(float(torch.dot(norms["contrastive_loss"], norms["daa"])
                                             / norms["contrastive_loss"].norm() / norms["daa"].norm()))
        for key, variant in (("asp_soft_run_variant", "reference"), ("asp_soft_paper", "paper"),
                             ("asp_soft_tie_aware", "tie_aware")):
            St = torch.tensor(S, dtype=torch.float32)
            expected[key].append(float(asp_soft(St, M, 0.001, variant) + asp_soft(St.t(), M.t(), 0.001, variant)) / 2)
        expected["asp_exact"].append((evaluation.asp(S, M.numpy()) + evaluation.asp(S.T, M.numpy().T)) / 200)
    assert got["epoch"] == 0
    for key, values in expected.items():
        assert got[key] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-6), key
    assert 0 < got["asp_exact"] < 1 and got["hinge_grad_norm"] > 0 and got["daa_grad_norm"] > 0


def test_markdown_has_a_row_per_epoch():
    epochs = [dict({key: 0.5 for key, _, _ in daa_diagnosis.COLUMNS}, epoch=e) for e in range(3)]
    table = daa_diagnosis.markdown({"SGR_w25_reference": epochs})
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2"]
