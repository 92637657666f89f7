"""ASP the straightforward ways: the original's per-row double argsort, and the exact definition as loops.

`asp_sort` follows the released SGRAF-DAA evaluation: for every query row, rank = position in a
descending argsort (argsort of the argsort, + 1) for both the scores and the relevance, then
mean(min / max). With ties its value depends on the sort's order among equal values. `asp_loop` is the
definition evaluation.asp implements, written as plain loops over queries and items: a tied score ranks
after every item it ties with (rank_s = 1 + #{a != c : s[a] >= s[c]}), a tied relevance takes the
average rank of its block (rank_r = 1 + #{a : r[a] > r[c]} + 1/2 #{a != c : r[a] = r[c]}). It is the
yardstick for evaluation.asp in the tests. Both return percent; rows of S and M are the queries (pass
S.T, M.T for t2i).
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


def asp_loop(S, M):
    """The definition, one query and item at a time (slow: for small matrices)."""
    total = 0.0
    n_q, n = S.shape
    for q in range(n_q):
        s, r = S[q], M[q]
        for c in range(n):
            rank_s = 1 + sum(1 for a in range(n) if a != c and s[a] >= s[c])
            rank_r = 1 + sum(1 for a in range(n) if r[a] > r[c]) + 0.5 * sum(1 for a in range(n) if a != c and r[a] == r[c])
            total += min(rank_s, rank_r) / max(rank_s, rank_r)
    return 100.0 * total / (n_q * n)
