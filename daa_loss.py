"""The training objective: VSE++ hinge triplet loss + DAA, and the semantic relevance DAA ranks by.

DAA ("Differentiable ASP Approximation", Li et al. NeurIPS 2022) replaces the hard ranks of the ASP
metric by sums of steep sigmoids so that the metric can be optimised directly:

    sigma_tau(x) = 1 / (1 + exp(clamp(-x / tau, -50, 50)))
    R(q, c)      = 1 + sum_{a != c} sigma_tau(X[q, a] - Y[q, c])
    ASP_soft     = mean_{q, c} min(R_S, R_M) / max(R_S, R_M)

With X = Y = S ("paper" variant, the formula as printed) R is the soft rank of item c in query q's row.
The released code uses X = S^T, Y = S ("reference" variant: R(b, c) = 1 + sum_{a != c} sigma(S[a, b] -
S[b, c])), which mixes rows and columns. That is what trained the published models, so it is the loss's
default; the two are different objectives (their gradients on one batch have cosine 0.27 for SGR and
-0.14 for SAF), not two implementations of one.

Both count a tied score as half (sigma_tau(0) = 1/2: average ranks), while the ASP metric ranks a tie after
everything it ties with, so their surrogate rewards ties (a constant batch beats random scores). The
"tie_aware" variant (this project's) ranks within rows as "paper" and shifts the score side's sigmoid by
tau ln((1 - tau) / tau), so a tie counts 1 - tau; the relevance side keeps average ranks. As tau -> 0 it
tends to the metric, ties included.

Memory: the direct form materialises an N x N x N tensor (and autograd keeps several), 512 MB per
tensor at N = 512. Here the comparisons are made in blocks of queries, forward and backward, through a
custom autograd function that keeps only the N x N inputs and recomputes each block's sigmoids in the
backward pass. The relevance ranks need no gradient at all.
"""
import math

import numpy as np
import scipy.sparse
import torch
import torch.nn as nn
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

from errors import InputError

# Elements of one block of comparisons (queries x items x items): 2^20 floats = 4 MB, a block that stays
# in cache while the few in-place passes over it run (64 MB blocks measured ~10x slower on CPU).
BLOCK_ELEMENTS = 1 << 20
VARIANTS = ("reference", "paper", "tie_aware")  # --daa_variant's choices; the first is the default


# ------------------------------------------------------------------------------------------------
# Semantic relevance: the paper's "CIDEr" map, a TF-IDF cosine between captions.


class SemanticRelevance:
    """TF-IDF relevance of every image to every caption of one split, kept sparse.

    M[i, j] = c_i . t_j, where t_j is caption j's l2-normalised TF-IDF row and c_i the mean of image
    i's captions' rows (= the mean cosine of image i's captions with caption j). Captions 5i..5i+4
    belong to image i. A dense TF-IDF of COCO train (566k captions) would need ~100 GB; the sparse
    rows need a few hundred MB.
    """

    def __init__(self, captions, captions_per_image=5, source="captions"):
        if len(captions) % captions_per_image:
            raise InputError(f"{source}: {len(captions)} captions is not a multiple of {captions_per_image}")
        self.vectorizer, self.tfidf = CountVectorizer(), TfidfTransformer()
        try:
            counts = self.vectorizer.fit_transform(captions)
        except ValueError:  # scikit-learn's "empty vocabulary": no token of two or more letters or digits
            raise InputError(f"{source}: no caption has a word of two or more characters; "
                             f"the TF-IDF relevance needs words") from None
        self.caption_rows = self.tfidf.fit_transform(counts).astype(np.float32).tocsr()  # (n_caps, V)
        n_images = len(captions) // captions_per_image
        averaging = scipy.sparse.csr_matrix(
            (np.full(len(captions), 1.0 / captions_per_image, dtype=np.float32),
             (np.repeat(np.arange(n_images), captions_per_image), np.arange(len(captions)))),
            shape=(n_images, len(captions)))
        self.image_rows = (averaging @ self.caption_rows).tocsr()  # (n_images, V)
        self.n_images, self.n_captions = n_images, len(captions)

    def tfidf_rows(self, captions):
        """l2-normalised TF-IDF rows, float64 sparse (len(captions), V), of any captions in this split's
        vocabulary and idf (words the split never uses are dropped)."""
        return self.tfidf.transform(self.vectorizer.transform(captions))

    def block(self, image_ids, caption_ids):
        """Relevance of the given images to the given captions: float32 (len(image_ids), len(caption_ids))."""
        rows = self.image_rows[np.asarray(image_ids)]
        cols = self.caption_rows[np.asarray(caption_ids)]
        return np.asarray((rows @ cols.T).todense(), dtype=np.float32)

    def matrix(self, image_ids=None):
        """Dense relevance rows of `image_ids` (default: all images) to every caption: (n, n_captions)."""
        ids = np.arange(self.n_images) if image_ids is None else np.asarray(image_ids)
        return self.block(ids, np.arange(self.n_captions))


# ------------------------------------------------------------------------------------------------
# Soft ranks


def _block_size(n_items):
    return max(1, BLOCK_ELEMENTS // max(1, n_items * n_items))


class _SoftRank(torch.autograd.Function):
    """R[q, c] = 1 + sum_{a != c} sigma_tau(X[q, a] - Y[q, c]) for X, Y of shape (n_q, n), blockwise.

    Each block (b, a, c) of comparisons is one buffer transformed in place (difference, scale, sigmoid)
    and reduced; the a == c terms are excluded by zeroing the block's diagonal. Backward recomputes
    the sigmoids: d sigma_tau / d diff = sigma (1 - sigma) / tau, with 1 / tau applied to the (n_q, n)
    results rather than to the block. Beyond the clamp (|diff| / tau > 50) that slope is below 2e-19
    instead of autograd's exact 0, far under fp32 resolution of any gradient it is summed into.
    """

    @staticmethod
    def forward(ctx, X, Y, temp):
        ctx.save_for_backward(X, Y)
        ctx.temp = temp
        ranks = torch.empty(Y.shape, dtype=Y.dtype, device=Y.device)
        step = _block_size(X.shape[1])
        for start in range(0, X.shape[0], step):
            x, y = X[start:start + step], Y[start:start + step]
            sig = torch.sub(x.unsqueeze(2), y.unsqueeze(1)).div_(temp).clamp_(-50.0, 50.0).sigmoid_()  # (b, a, c)
            sig.diagonal(dim1=1, dim2=2).zero_()
            torch.sum(sig, 1, out=ranks[start:start + step])
        return ranks.add_(1.0)

    @staticmethod
    def backward(ctx, grad_ranks):
        X, Y = ctx.saved_tensors
        temp = ctx.temp
        grad_ranks = grad_ranks.contiguous()
        grad_x = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        grad_y = torch.empty(Y.shape, dtype=Y.dtype, device=Y.device)
        step = _block_size(X.shape[1])
        for start in range(0, X.shape[0], step):
            x, y, g = X[start:start + step], Y[start:start + step], grad_ranks[start:start + step]
            slope = torch.sub(x.unsqueeze(2), y.unsqueeze(1)).div_(temp).sigmoid_()  # (b, a, c)
            slope.addcmul_(slope, slope, value=-1.0)  # sigma (1 - sigma) = tau d sigma_tau / d diff
            slope.diagonal(dim1=1, dim2=2).zero_()
            torch.bmm(slope, g.unsqueeze(2), out=grad_x[start:start + step].unsqueeze(2))
            torch.sum(slope, 1, out=grad_y[start:start + step])
        return grad_x.div_(temp), grad_y.mul_(grad_ranks).div_(-temp), None


def tie_shift(temp):
    """The score-side shift of `tie_aware`: tau * ln((1 - tau) / tau), so that sigma_tau(0 + shift) = 1 - tau.

    A tie then counts as ranked above (within tau of the metric's 1), and as tau -> 0 the shift (~ tau ln 1/tau)
    vanishes while shift / tau grows without bound: the soft rank tends to the metric's rank, ties included.
    """
    return temp * math.log((1.0 - temp) / temp)


def soft_rank(S, temp=0.001, variant="paper"):
    """Soft rank of every item in every query row of S (n_q, n): (n_q, n); differentiable in S.

    paper, reference: sigma_tau(0) = 1/2, a tie counts half (the average rank, right for relevance);
    tie_aware: paper's row ranks with sigma_tau(0 + tie_shift) = 1 - tau, a tie counts as ranked above
    (the metric's rank of a score).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DAA variant {variant!r} ({'|'.join(VARIANTS)})")
    if variant == "reference":
        if S.shape[0] != S.shape[1]:
            raise ValueError(f"the reference DAA variant needs a square matrix, got {tuple(S.shape)}")
        return _SoftRank.apply(S.t(), S, temp)
    if variant == "tie_aware":
        # sigma_tau(S[q, a] + shift - S[q, c]): an (n_q, n) addition, not one more pass over every block
        return _SoftRank.apply(S + tie_shift(temp), S, temp)
    return _SoftRank.apply(S, S, temp)


def asp_soft(S, M, temp=0.001, variant="paper"):
    """Differentiable ASP in [0, 1] of scores S (n_q, n) against relevance M (n_q, n): a 0-dim tensor.

    `tie_aware` gives tied scores the metric's rank (last among those they tie with) and tied relevances
    the average rank, as evaluation.asp does; `paper` and `reference` give both the average rank.
    """
    relevance_variant = variant
    if variant == "tie_aware":
        relevance_variant = "paper"  # equal relevance is genuine: average ranks
        # row-major blocks: on a transposed view (the t2i direction) every block's buffer is strided, 2-5x slower
        S, M = S.contiguous(), M.contiguous()
    rank_s = soft_rank(S, temp, variant)
    with torch.no_grad():
        rank_m = soft_rank(M.to(S.dtype), temp, relevance_variant)
    return (torch.minimum(rank_s, rank_m) / torch.maximum(rank_s, rank_m)).mean()


# ------------------------------------------------------------------------------------------------
# The loss


def contrastive_loss(S, margin=0.2, max_violation=True):
    """VSE++ hinge triplet loss of a square image x caption score matrix S (N, N); pairs on the diagonal."""
    diagonal = S.diag().view(-1, 1)
    cost_caption = (margin + S - diagonal).clamp(min=0)  # image i vs. wrong captions j (rows)
    cost_image = (margin + S - diagonal.t()).clamp(min=0)  # caption j vs. wrong images i (columns)
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if max_violation:
        return cost_caption.max(1)[0].sum() + cost_image.max(0)[0].sum()
    return cost_caption.sum() + cost_image.sum()


class DAALoss(nn.Module):
    """Contrastive loss + daa_weight * [(1 - ASP_soft(S, M)) + (1 - ASP_soft(S^T, M^T))].

    forward(S (N, N), M (N, N) or None) -> dict of 0-dim tensors: loss, contrastive_loss,
    daa_i2t_loss, daa_t2i_loss (the DAA terms are 0 when M is None or daa_weight is 0).
    `max_violation` may be switched per call (the warm-up epochs sum the violations).
    """

    def __init__(self, margin=0.2, max_violation=True, daa_weight=25, daa_temp=0.001, daa_variant="reference"):
        super().__init__()
        if daa_variant not in VARIANTS:
            raise ValueError(f"unknown DAA variant {daa_variant!r} ({'|'.join(VARIANTS)})")
        self.margin, self.max_violation = margin, max_violation
        self.daa_weight, self.daa_temp, self.daa_variant = daa_weight, daa_temp, daa_variant

    def forward(self, S, M=None, max_violation=None):
        max_violation = self.max_violation if max_violation is None else max_violation
        if S.dtype in (torch.float16, torch.bfloat16):
            S = S.float()  # ranks and hinges in fp32 even under autocast
        contrastive = contrastive_loss(S, self.margin, max_violation)
        daa_i2t, daa_t2i = self.daa_terms(S, M)
        return {"loss": contrastive + daa_i2t + daa_t2i, "contrastive_loss": contrastive,
                "daa_i2t_loss": daa_i2t, "daa_t2i_loss": daa_t2i}

    def daa_terms(self, S, M):
        """The two weighted DAA terms (i2t, t2i) of scores S (N, N) against relevance M (0 without M)."""
        if M is None or not self.daa_weight:
            return S.new_zeros(()), S.new_zeros(())
        M = M.to(S.device, S.dtype)
        return (self.daa_weight * (1 - asp_soft(S, M, self.daa_temp, self.daa_variant)),
                self.daa_weight * (1 - asp_soft(S.t(), M.t(), self.daa_temp, self.daa_variant)))
