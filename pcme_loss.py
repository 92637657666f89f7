"""PCME's objective (Chun et al. CVPR 2021) + DAA, and PCME++'s (Chun, ICLR 2024) + DAA: what train.py
minimises for --module_name PCME and PCMEpp.

PCME:  loss = soft contrastive + vib_weight * KL + DAA on S

Soft contrastive: the negative log-likelihood of the batch's matches under the match probability
S[i, j] = mean_{k, l} sigmoid(logit[i, j, k, l]) (PCME's Monte-Carlo estimate over K x K sample pairs):
-log S[i, i] for each image's own caption, -log(1 - S[i, j]) for every other pair of the batch, summed,
and counted for i2t and again for t2i as PCME sums its two (identical) directions. The logs are taken in
log space (log mean sigmoid = logsumexp logsigmoid - log K^2): at PCME's initial scale the probabilities
underflow in fp32, their logs do not. KL: sum over the batch's items and dims of KL(N(mu, sigma^2) ||
N(0, I)), PCME's VIB regulariser. DAA: daa_loss.DAALoss's terms on S, as for every module.

PCME++:  loss = B^2 * (2 BCE(logits, I) + pseudo_weight * [BCE(logits, P_i2t) + BCE(logits, P_t2i)]
                       + vib_weight * KL) + DAA on -CSD

B^2 times naver-ai/pcmepp's ClosedFormSampledDistanceLoss: logits = -a CSD + b (B, B); BCE the binary
cross-entropy with logits, averaged over the B x B pairs, its i2t and t2i directions equal (hence 2x); I the
batch's matches: the diagonal and, as in PCME++'s training step, the pairs of an image drawn twice into the
batch (two of its captions), which a plain identity would push apart as a mismatch;
P_i2t[i, j] = 1 where logit[i, j] >= logit[i, i] (pseudo-positives of image i, its own caption among
them) or I[i, j], P_t2i[i, j] = 1 where logit[i, j] >= logit[j, j] or I[i, j], labels that carry no gradient;
KL the mean over items and dims, per modality, of the two modalities' KL to N(0, I). The factor B^2 turns PCME++'s means
over the B x B pairs into sums, as PCME's soft contrastive above (and PCME's code) sums its pairs, so that
--daa_weight weighs DAA against the matching loss as it does for PCME (assets/embedding_models.md: PCME++'s mean let DAA at
weight 1 swamp the matching loss); PCME++'s own terms keep their ratios. DAA ranks S = -CSD, the score
evaluation ranks by (assets/embedding_models.md).
"""
import math

import torch
import torch.nn.functional as F

from daa_loss import DAALoss


def soft_contrastive_loss(logits):
    """PCME's soft contrastive NLL of match logits (N, N, K, K'), own pairs on the diagonal: 0-dim tensor."""
    n = logits.size(0)
    samples = logits.size(2) * logits.size(3)
    flat = logits.reshape(n, n, samples)
    log_match = torch.logsumexp(F.logsigmoid(flat), 2) - math.log(samples)  # log S
    log_mismatch = torch.logsumexp(F.logsigmoid(-flat), 2) - math.log(samples)  # log (1 - S)
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    return -2 * torch.where(eye, log_match, log_mismatch).sum()


class PCMELoss(DAALoss):
    """forward(PCMEBatch, M (N, N) or None) -> dict of 0-dim tensors: loss, contrastive_loss (the soft
    contrastive), vib_loss (vib_weight x KL), daa_i2t_loss, daa_t2i_loss. `max_violation` is accepted and
    ignored (PCME has no hinge), so train.compute_losses calls every criterion alike."""

    def __init__(self, vib_weight=1e-5, daa_weight=25, daa_temp=0.001, daa_variant="reference"):
        super().__init__(daa_weight=daa_weight, daa_temp=daa_temp, daa_variant=daa_variant)
        self.vib_weight = vib_weight

    def forward(self, batch, M=None, max_violation=None):
        # in >= fp32 even under autocast, as DAALoss
        sims, logits, kl = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in batch)
        contrastive = soft_contrastive_loss(logits)
        vib = self.vib_weight * kl
        daa_i2t, daa_t2i = self.daa_terms(sims, M)
        return {"loss": contrastive + vib + daa_i2t + daa_t2i, "contrastive_loss": contrastive, "vib_loss": vib,
                "daa_i2t_loss": daa_i2t, "daa_t2i_loss": daa_t2i}


def pseudo_positive_matching(logits, matches=None):
    """PCME++'s matching loss with pseudo-positives, i2t + t2i, of logits (N, N), own pairs on the diagonal.

    Each direction: BCE(logits, labels) averaged over the N x N pairs, labels 1 where a pair's logit is at
    least its query's own pair's (image i: logit[i, j] >= logit[i, i]; caption j: logit[i, j] >= logit[j, j])
    and at the batch's matches (N, N) bool (None: the diagonal; see PCMEppLoss.forward).
    """
    own = logits.detach().diagonal()
    labels = [(logits.detach() >= own[:, None]), (logits.detach() >= own[None, :])]
    if matches is not None:
        labels = [label | matches for label in labels]
    return sum(F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype)) for label in labels)


class PCMEppLoss(DAALoss):
    """forward(PCMEBatch of -CSD (N, N), logits (N, N), KL; M (N, N) or None) -> dict of 0-dim tensors: loss,
    contrastive_loss (N^2 x PCME++'s matching loss, 2 BCE), pseudo_positive_loss (N^2 x pseudo_weight x its
    pseudo-positive matching), vib_loss (N^2 x vib_weight x KL), daa_i2t_loss, daa_t2i_loss. Defaults: PCME++'s
    config (vib_beta 1e-4, smoothness_alpha 0.1). `max_violation` is accepted and ignored, as by PCMELoss."""

    def __init__(self, vib_weight=1e-4, pseudo_weight=0.1, daa_weight=25, daa_temp=0.001, daa_variant="reference"):
        super().__init__(daa_weight=daa_weight, daa_temp=daa_temp, daa_variant=daa_variant)
        self.vib_weight, self.pseudo_weight = vib_weight, pseudo_weight

    def forward(self, batch, M=None, max_violation=None, matches=None):
        """matches: (N, N) bool, True where image i and caption j belong to the same image (the diagonal and
        the pairs of an image drawn twice into the batch, which PCME++'s training step labels 1 as well);
        None: the diagonal only (train.compute_losses gives them from the batch's image ids)."""
        sims, logits, kl = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in batch)
        pairs = logits.numel()  # PCME++'s means over the B x B pairs, made sums (module docstring)
        if matches is None:
            matches = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        matches = matches.to(logits.device, torch.bool)
        matching = pairs * 2 * F.binary_cross_entropy_with_logits(logits, matches.to(logits.dtype))
        pseudo = pairs * self.pseudo_weight * pseudo_positive_matching(logits, matches)
        vib = pairs * self.vib_weight * kl
        daa_i2t, daa_t2i = self.daa_terms(sims, M)
        return {"loss": matching + pseudo + vib + daa_i2t + daa_t2i, "contrastive_loss": matching,
                "pseudo_positive_loss": pseudo, "vib_loss": vib, "daa_i2t_loss": daa_i2t, "daa_t2i_loss": daa_t2i}
