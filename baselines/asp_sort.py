"""ASP the straightforward ways: the original's per-row double argsort, and the exact average-rank loop.

`asp_sort` follows the released SGRAF-DAA evaluation: for every query row, rank = position in a
descending argsort (argsort of the argsort, + 1) for both the scores and the relevance, then
mean(min / max). With ties its value depends on the sort's order among equal values, which is why
evaluation.asp uses average ranks instead. `asp_average_loop` is SPEC's definition written as plain
loops over queries and items, the yardstick for evaluation.asp in the tests.
Both return percent; rows of S and M are the queries (pass S.T, M.T for t2i).
"""
import numpy as np


def asp_sort(S, M):
    """100 mean over rows of min/max of the double-argsort ranks of S and M (the original's ASP_compute)."""
    total = 0.0
    for s, m in zip(S, M):
        rank_s = np.argsort(np.argsort(-s, kind="stable"), kind="stable") + 1
        rank_m = np.argsort(np.argsort(-m, kind="stable"), kind="stable") + 1
        total += float(np.mean(np.minimum(rank_s, rank_m) / np.maximum(rank_s, rank_m)))
    return 100.0 * total / len(S)


def asp_average_loop(S, M):
    """SPEC's ASP: rank(c) = 1 + #{a: x[a] > x[c]} + 1/2 #{a != c: x[a] = x[c]}, one query and item at a time."""
    total = 0.0
    n_q, n = S.shape
    for q in range(n_q):
        for c in range(n):
            ranks = []
            for x in (S[q], M[q]):
                greater = sum(1 for a in range(n) if x[a] > x[c])
                equal = sum(1 for a in range(n) if a != c and x[a] == x[c])
                ranks.append(1 + greater + 0.5 * equal)
            total += min(ranks) / max(ranks)
    return 100.0 * total / (n_q * n)
