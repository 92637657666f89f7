"""DAA loss: blockwise soft ranks against the direct N^3 form, the tau -> 0 limit, gradients, variants."""
import re

import numpy as np
import pytest
import scipy.stats
import torch

import daa_loss
import evaluation
from tools.baselines.daa_direct import asp_soft_direct, daa_loss_direct, soft_rank_direct


def exact_asp(S, M):
    """ASP with average ranks of rows of S against rows of M, in [0, 1] (DAA's tau -> 0 limit)."""
    rank_s = scipy.stats.rankdata(-S, method="average", axis=1)
    rank_m = scipy.stats.rankdata(-M, method="average", axis=1)
    return float(np.mean(np.minimum(rank_s, rank_m) / np.maximum(rank_s, rank_m)))


@pytest.mark.parametrize("variant", ["paper", "reference", "tie_aware"])
def test_blockwise_equals_direct_values_and_gradients(variant, monkeypatch):
    monkeypatch.setattr(daa_loss, "BLOCK_ELEMENTS", 7 * 13 * 13)  # several uneven blocks
    gen = torch.Generator().manual_seed(0)
    S = torch.rand(13, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    M = torch.rand(13, 13, generator=gen, dtype=torch.float64)
    temp = 0.05
    shift = temp * np.log((1 - temp) / temp) if variant == "tie_aware" else 0.0  # sigma_tau(shift) = 1 - tau
    ranks = daa_loss.soft_rank(S, temp, variant)
    torch.testing.assert_close(ranks, soft_rank_direct(S, temp, variant, shift))
    weights = torch.rand(13, 13, generator=gen, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad((ranks * weights).sum(), S)
    (grad_direct,) = torch.autograd.grad((soft_rank_direct(S, temp, variant, shift) * weights).sum(), S)
    torch.testing.assert_close(grad_fast, grad_direct)
    loss = daa_loss.DAALoss(daa_weight=3.0, daa_temp=temp, daa_variant=variant)(S, M)
    # each term under its own name: i2t ranks within rows of S (images are the queries), t2i within columns
    i2t = 3.0 * (1 - asp_soft_direct(S, M, temp, variant))
    t2i = 3.0 * (1 - asp_soft_direct(S.t(), M.t(), temp, variant))
    assert abs(float((i2t - t2i).detach())) > 1e-2  # an asymmetric case: the names are not interchangeable
    torch.testing.assert_close(loss["daa_i2t_loss"], i2t)
    torch.testing.assert_close(loss["daa_t2i_loss"], t2i)
    torch.testing.assert_close(loss["daa_i2t_loss"] + loss["daa_t2i_loss"], daa_loss_direct(S, M, 3.0, temp, variant))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    S = torch.rand(6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    M = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    for variant in ("paper", "reference", "tie_aware"):
        assert torch.autograd.gradcheck(lambda s: daa_loss.asp_soft(s, M, 0.1, variant), (S,))
        assert torch.autograd.gradcheck(lambda s: daa_loss.asp_soft(s.t(), M.t(), 0.1, variant), (S,))


def test_soft_asp_approaches_exact_asp_as_temperature_falls():
    rng = np.random.default_rng(2)
    S, M = rng.random((20, 50)), rng.random((20, 50))  # continuous: no ties
    exact = exact_asp(S, M)
    errors = [abs(float(daa_loss.asp_soft(torch.tensor(S), torch.tensor(M), temp)) - exact)
              for temp in (1e-1, 1e-2, 1e-9)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-12


def metric_asp(S, M):
    """The metric's ASP in [0, 1], restated with scipy: a score ranks after everything it ties with (rank
    1 + #{a != c: s_a >= s_c}, rankdata's "max" of -s), a relevance takes the average rank of its ties."""
    rank_s = scipy.stats.rankdata(-S, method="max", axis=1)
    rank_m = scipy.stats.rankdata(-M, method="average", axis=1)
    return float(np.mean(np.minimum(rank_s, rank_m) / np.maximum(rank_s, rank_m)))


@pytest.mark.parametrize("ties", ["none", "scores", "both"])
def test_tie_aware_tends_to_the_metric_ties_included(ties):
    """tie_aware -> the exact ASP of evaluation.asp as tau -> 0, both directions, with and without tied values."""
    rng = np.random.default_rng(7)
    S, M = rng.random((12, 30)), rng.random((12, 30))
    if ties in ("scores", "both"):
        S = np.round(S * 4) / 4  # five distinct values: many ties in every row and column
    if ties == "both":
        M = np.round(M * 3) / 3
    for rows_S, rows_M in ((S, M), (S.T, M.T)):
        exact = metric_asp(rows_S, rows_M)
        assert exact == pytest.approx(evaluation.asp(rows_S, rows_M) / 100, abs=1e-12)
        errors = [abs(float(daa_loss.asp_soft(torch.tensor(rows_S), torch.tensor(rows_M), temp, "tie_aware")) - exact)
                  for temp in (1e-2, 1e-4, 1e-9)]
        assert errors[0] > errors[2] and errors[1] > errors[2]
        assert errors[2] < 1e-7
    if ties != "none":  # the other variants give tied scores the average rank instead: another limit
        assert abs(float(daa_loss.asp_soft(torch.tensor(S), torch.tensor(M), 1e-9, "paper")) - metric_asp(S, M)) > 1e-3


def test_tie_aware_gives_constant_scores_no_more_than_random_ones():
    """On 128 x 128 batches: paper's surrogate rewards a constant matrix (above random scores by ~0.1);
    tie_aware puts it at or below random scores (their mean over draws), within 0.005 of where the metric puts
    it: on relevance without ties the metric gives constant scores the random draws' mean; on relevance with
    many ties (five values) random scores earn a little more than constant ones, in the metric as well."""
    gen = torch.Generator().manual_seed(11)
    for M in (torch.rand(128, 128, generator=gen), torch.round(torch.rand(128, 128, generator=gen) * 4) / 4):
        constant = torch.full_like(M, 0.5)
        randoms = [torch.rand(128, 128, generator=gen) for _ in range(10)]
        for direction in (lambda x: x, lambda x: x.t()):
            def surrogate(S, variant):
                return float(daa_loss.asp_soft(direction(S), direction(M), 0.001, variant))

            def metric(S):
                return evaluation.asp(direction(S).numpy(), direction(M).numpy()) / 100

            surrogate_gap = np.mean([surrogate(R, "tie_aware") for R in randoms]) - surrogate(constant, "tie_aware")
            metric_gap = np.mean([metric(R) for R in randoms]) - metric(constant)
            assert surrogate_gap >= 0 and surrogate_gap == pytest.approx(metric_gap, abs=0.005)
            assert surrogate(constant, "paper") > np.mean([surrogate(R, "paper") for R in randoms]) + 0.05


def test_tie_shift_makes_a_tie_count_one_minus_tau():
    for temp in (1e-1, 1e-3, 1e-6):
        shift = daa_loss.tie_shift(temp)
        assert float(torch.sigmoid(torch.tensor(shift / temp, dtype=torch.float64))) == pytest.approx(1 - temp, rel=1e-12)
    ranks = daa_loss.soft_rank(torch.zeros(1, 4, dtype=torch.float64), 1e-3, "tie_aware")
    torch.testing.assert_close(ranks, torch.full((1, 4), 1 + 3 * (1 - 1e-3), dtype=torch.float64))


def test_training_option_and_loss_know_every_variant():
    import opts

    choices = next(a.choices for a in opts.build_parser()._actions if a.dest == "daa_variant")
    assert tuple(choices) == daa_loss.VARIANTS and daa_loss.VARIANTS[0] == "reference"  # the default stays
    with pytest.raises(ValueError, match="tie_aware"):
        daa_loss.DAALoss(daa_variant="ties")


def test_ties_give_average_ranks():
    """sigma(0) = 1/2: equal relevances get the average rank of their block, exactly as in ASP."""
    M = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    ranks = daa_loss.soft_rank(M, 1e-3)
    torch.testing.assert_close(ranks, torch.tensor([[3.0, 3.0, 1.0, 3.0]], dtype=torch.float64))


def test_reference_variant_differs_on_asymmetric_and_agrees_on_symmetric():
    gen = torch.Generator().manual_seed(3)
    A = torch.rand(8, 8, generator=gen, dtype=torch.float64)
    M = torch.rand(8, 8, generator=gen, dtype=torch.float64)
    paper = daa_loss.asp_soft(A, M, 0.01, "paper")
    reference = daa_loss.asp_soft(A, M, 0.01, "reference")
    assert abs(float(paper - reference)) > 1e-3
    S, Msym = A + A.t(), M + M.t()
    torch.testing.assert_close(daa_loss.asp_soft(S, Msym, 0.01, "paper"),
                               daa_loss.asp_soft(S, Msym, 0.01, "reference"))
    torch.testing.assert_close(asp_soft_direct(A, M, 0.01, "reference"), reference)


def brute_contrastive(S, margin, max_violation):
    n = len(S)
    total = 0.0
    for i in range(n):
        costs_c = [max(0.0, margin + S[i][j] - S[i][i]) for j in range(n) if j != i]
        costs_i = [max(0.0, margin + S[j][i] - S[i][i]) for j in range(n) if j != i]
        total += (max(costs_c) + max(costs_i)) if max_violation else (sum(costs_c) + sum(costs_i))
    return total


@pytest.mark.parametrize("max_violation", [True, False])
def test_contrastive_loss_against_loops(max_violation):
    S = torch.rand(7, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = daa_loss.DAALoss(max_violation=max_violation, daa_weight=0)(S, S)
    assert float(got["contrastive_loss"]) == pytest.approx(brute_contrastive(S.tolist(), 0.2, max_violation))
    assert float(got["daa_i2t_loss"]) == 0 and float(got["daa_t2i_loss"]) == 0
    assert float(got["loss"]) == pytest.approx(float(got["contrastive_loss"]))


def test_collapsed_scores_give_the_stuck_loss():
    """All scores equal: max-violation loss is 2 * N * margin (the plateau of the first epochs without warm-up)."""
    got = daa_loss.DAALoss()(torch.full((32, 32), 0.5))
    assert float(got["contrastive_loss"]) == pytest.approx(2 * 32 * 0.2)


def peak_rss_during(fn):
    """Bytes the process's peak resident memory rose above its resident memory while fn() ran (Linux:
    /proc/self/clear_refs resets the peak, VmHWM, to the current size)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("peak memory is measured through /proc/self (Linux)")

    def status(field):
        with open("/proc/self/status") as f:
            return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))

    start = status("VmRSS")
    fn()
    return status("VmHWM") - start


def test_large_batch_memory_is_bounded():
    """N = 512, forward + backward, peaks below 64 MB more than it started with; the direct form's
    single (N, N, N) tensor of comparisons alone is 512 MB."""
    gen = torch.Generator().manual_seed(5)
    S = torch.rand(512, 512, generator=gen, requires_grad=True)
    M = torch.rand(512, 512, generator=gen)

    def loss_and_gradient():
        daa_loss.DAALoss()(S, M)["loss"].backward()

    daa_loss.DAALoss()(S[:64, :64], M[:64, :64])["loss"].backward()  # first use pages in the kernels' code
    S.grad = None
    assert peak_rss_during(lambda: torch.ones(32 << 20).add_(1)) > 120 << 20  # the measure sees a 128 MB tensor
    assert peak_rss_during(loss_and_gradient) < 64 << 20
    assert torch.isfinite(S.grad).all() and S.grad.abs().sum() > 0


def test_semantic_relevance_block_matches_definition():
    captions = ["a dog runs", "the dog runs fast", "a cat sleeps", "dog and cat", "a red bus",
                "a bus stops", "cat on a bus", "the red dog", "people walk", "a dog walks"]
    rel = daa_loss.SemanticRelevance(captions, captions_per_image=5)
    # independent: cosine of raw TF-IDF rows, averaged over each image's captions
    from sklearn.feature_extraction.text import TfidfVectorizer
    T = TfidfVectorizer().fit_transform(captions).toarray()
    expected = np.stack([T[5 * i:5 * i + 5].mean(0) for i in range(2)]) @ T.T
    np.testing.assert_allclose(rel.matrix(), expected, atol=1e-6)
    np.testing.assert_allclose(rel.block([1, 0], [3, 9, 0]), expected[[1, 0]][:, [3, 9, 0]], atol=1e-6)
