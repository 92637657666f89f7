"""DAA in the original's direct form: one (N, N, N) tensor of comparisons, autograd through all of it.

Used by the tests (the blockwise version must agree with it) and by bench.py (time and memory).
"""
import math

import torch


def soft_rank_direct(S, temp=0.001, variant="paper", shift=0.0):
    """R[q, c] = 1 + sum_{a != c} sigma_tau(X[q, a] - Y[q, c] + shift); X = S^T (reference) or S (paper,
    tie_aware), Y = S; tie_aware's score ranks take shift = tau ln((1 - tau) / tau), so sigma_tau(shift) = 1 - tau."""
    X = S.t() if variant == "reference" else S
    diff = X.unsqueeze(2) - S.unsqueeze(1) + shift  # (q, a, c)
    sig = 1.0 / (1.0 + torch.exp(torch.clamp(-diff / temp, -50, 50)))
    off_diagonal = 1.0 - torch.eye(S.shape[1], dtype=S.dtype, device=S.device)
    return 1.0 + (sig * off_diagonal.unsqueeze(0)).sum(1)


def asp_soft_direct(S, M, temp=0.001, variant="paper"):
    shift = temp * math.log((1 - temp) / temp) if variant == "tie_aware" else 0.0
    rank_s = soft_rank_direct(S, temp, variant, shift)
    rank_m = soft_rank_direct(M, temp, variant)
    return (torch.minimum(rank_s, rank_m) / torch.maximum(rank_s, rank_m)).mean()


def daa_loss_direct(S, M, weight=25.0, temp=0.001, variant="paper"):
    """daa_weight * [(1 - ASP_soft(S, M)) + (1 - ASP_soft(S^T, M^T))], the direct way."""
    return weight * ((1 - asp_soft_direct(S, M, temp, variant)) + (1 - asp_soft_direct(S.t(), M.t(), temp, variant)))
