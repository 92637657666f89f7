"""The embedding models' heads: VSE, PCME and PCME++, whose every image and caption is one point (or one
Gaussian) in a joint space, and VSE∞'s generalized pooling (GPO) that VSE and PCME++ pool with.

Each head is the third part (`sim_enc`) of model.SimilarityModel: it pools the shared encoders' regions and
words (encoders.py) into one vector per item, so that a gallery is scored by one matrix product instead of
a network run on every pair.

Shapes: n_i images of R = 36 regions, n_c captions of at most L words, d = embed_size, K samples.
"""
import contextlib
import math
from collections import namedtuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from encoders import init_weights, l2norm, masked_mean

EMBEDDING_MODULES = ("VSE", "PCME", "PCMEpp")
# What PCME's and PCME++'s forward return in training: the scores DAA sees (B, B), the match logits the
# loss is computed from (PCME: (B, B, K, K) of the sample pairs; PCME++: (B, B)) and the KL of the batch's
# Gaussians to N(0, I) (PCME: summed over items and dims; PCME++: its mean over them).
PCMEBatch = namedtuple("PCMEBatch", "sims logits kl")
# PCME's initial match-probability scale a and shift b. PCME's COCO config starts both at 15 in its
# sigma(x) = e^x / (e^x + e^-x) = sigmoid(2x); written with the plain sigmoid, as here, that is 30 and 30.
PCME_INIT_SCALE = 30.0
PCME_INIT_SHIFT = 30.0
PCME_INIT_NOISE = 0.1  # initial norm of a sample's noise, see GaussianHead
# PCME++'s initial a (its "negative_scale") and b ("shift"): configs/pcmepp.yaml of naver-ai/pcmepp.
PCMEPP_INIT_SCALE = 5.0
PCMEPP_INIT_SHIFT = 5.0
CENTER_MOMENTUM = 0.1  # --pcmepp_center_means: running centre's update per training batch, as BatchNorm's default
# VSE∞'s GPO (woodfrog/vse_infty lib/modules/aggr/gpo.py, GPO(32, 32)): positional encoding size, GRU
# hidden size, and the softmax temperature of its pooling weights.
GPO_PE_DIM = 32
GPO_HIDDEN = 32
GPO_TEMPERATURE = 0.1


@contextlib.contextmanager
def in_score_precision(tensor):
    """Autocast off and the dtype to score in, >= fp32: as SGR/SAF's score head, an embedding model's scores
    stay fp32 under --precision bf16 (bf16 scores would tie pairs fp32 ranks apart); the encoders still
    run in bf16."""
    with torch.autocast(tensor.device.type, enabled=False):
        yield torch.promote_types(tensor.dtype, torch.float32)


def word_mask(lengths, width, device):
    """(n, width) bool, True at each caption's real words; lengths (n,) int."""
    return torch.arange(width, device=device) < torch.as_tensor(lengths, device=device)[:, None]


def pool(local, mask, how):
    """local (n, P, d), mask (n, P) bool of the real positions -> (n, d): their mean or elementwise max."""
    if how == "mean":
        return masked_mean(local.masked_fill(~mask.unsqueeze(2), 0), mask)
    if how == "max":
        return local.masked_fill(~mask.unsqueeze(2), float("-inf")).amax(1)
    raise ValueError(f"pooling must be mean or max, not {how!r}")


def sinusoid_positions(length, dim, dtype=torch.float32, device=None):
    """The Transformer's positional encoding of positions 0..length-1: (length, dim), sin(p / 10000^(2k / dim))
    in column 2k, cos of the same in column 2k + 1 (dim even)."""
    position = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / dim))
    angle = position * frequency
    return torch.stack([angle.sin(), angle.cos()], 2).view(length, dim).to(dtype)


class GPO(nn.Module):
    """VSE∞'s generalized pooling operator (Chen et al. CVPR 2021): local features (n, P, d) -> (n, d).

    Each dimension's values over an item's real positions are sorted in descending order, and the k-th
    largest gets weight w_k: a learned mix of max pooling (w_1 = 1), mean pooling (all equal) and
    anything between, per dimension alike. The weights depend on the number of real positions only: the
    sin/cos encodings of positions 0..len-1 (GPO_PE_DIM) run through a bi-GRU (GPO_HIDDEN, the directions
    averaged), a linear map (no bias) scores each position, and a softmax at temperature GPO_TEMPERATURE
    over the real positions makes them weights. GRU and linear keep torch's initialisation, as VSE∞.
    """

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(GPO_PE_DIM, GPO_HIDDEN, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(GPO_HIDDEN, 1, bias=False)

    def weights(self, lengths, width):
        """Pooling weights (n, width) of items with `lengths` (n,) real positions (each >= 1); 0 beyond them.

        Computed once per distinct length (an item's weights do not depend on the other items of the batch).
        """
        distinct, which = torch.unique(lengths, return_inverse=True)
        dtype, device = self.linear.weight.dtype, self.linear.weight.device
        real = torch.arange(width, device=device) < distinct[:, None].to(device)  # (u, width)
        positions = sinusoid_positions(width, GPO_PE_DIM, dtype, device).expand(len(distinct), width, GPO_PE_DIM)
        packed = pack_padded_sequence(positions, distinct.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=width)
        out = (out[:, :, :GPO_HIDDEN] + out[:, :, GPO_HIDDEN:]) / 2
        logits = self.linear(out).squeeze(2).masked_fill(~real, float("-inf"))
        return torch.softmax(logits / GPO_TEMPERATURE, 1)[which.to(device)]

    def forward(self, local, mask):
        """local (n, P, d), mask (n, P) bool, True at the real positions, which come first -> (n, d)."""
        padded = ~mask.unsqueeze(2)
        # padding sorts last (-inf), then counts as 0 (and gets no gradient)
        ranked = local.masked_fill(padded, float("-inf")).sort(dim=1, descending=True).values.masked_fill(padded, 0)
        weights = self.weights(mask.sum(1), local.size(1)).to(local.dtype)
        return torch.bmm(weights.unsqueeze(1), ranked).squeeze(1)


def all_positions(regions):
    """(n, R) bool, all True: every region of an image is real."""
    return regions.new_ones(regions.shape[:2], dtype=torch.bool)


class VSEHead(nn.Module):
    """VSE: regions and words pooled into one l2-normalised vector per item; score = their cosine.

    Pooling mean or max: no parameters (the image side's projection is EncoderImage's fc, the text side
    EncoderText's GRU). Pooling gpo: VSE∞'s GPO, one for the regions and one for the words, as VSE∞.
    """

    module_name = "VSE"

    def __init__(self, pooling="mean"):
        super().__init__()
        self.pooling = pooling
        if pooling == "gpo":
            self.image_pool, self.caption_pool = GPO(), GPO()

    def _pool(self, local, mask, gpo_name):
        return getattr(self, gpo_name)(local, mask) if self.pooling == "gpo" else pool(local, mask, self.pooling)

    def embed_images(self, regions):
        """(n, R, d) -> (n, d) unit vectors."""
        return l2norm(self._pool(regions, all_positions(regions), "image_pool"))

    def embed_captions(self, words, lengths):
        """(n, L, d) words, (n,) lengths -> (n, d) unit vectors."""
        return l2norm(self._pool(words, word_mask(lengths, words.size(1), words.device), "caption_pool"))

    def forward(self, img_embs, cap_embs):
        """(n_i, d), (n_c, d) unit vectors -> cosines (n_i, n_c), in >= fp32 (see `in_score_precision`)."""
        with in_score_precision(img_embs) as dtype:
            return img_embs.to(dtype) @ cap_embs.to(dtype).t()


class GaussianHead(nn.Module):
    """PCME's head of one modality: local features (n, P, d) -> mean and log-variance (n, 2, d).

    mean = l2norm(mean of the real positions) (PCME's mean is l2-normalised; its PIE-net attention
    residual on the mean is left out). log-variance = fc(attention pooling) + fc2(mean pooling), PCME's
    uncertainty module (one attention head: softmax over positions of w2 tanh(W1 x), W1 d -> d/2).
    """

    def __init__(self, embed_size):
        super().__init__()
        hidden = max(1, embed_size // 2)
        self.attention = nn.Sequential(nn.Linear(embed_size, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.fc = nn.Linear(embed_size, embed_size)
        self.fc2 = nn.Linear(embed_size, embed_size)
        init_weights(self)
        # Initial noise norm sqrt(d) sigma = PCME_INIT_NOISE: with sigma = 1 (a zero bias) the noise of d
        # dims would swamp the unit means, every match probability would start at 0 and, on the small
        # data sets tried, the means never learnt to separate.
        nn.init.constant_(self.fc2.bias, 2 * math.log(PCME_INIT_NOISE / math.sqrt(embed_size)))

    def forward(self, local, mask):
        """local (n, P, d), 0 at padded positions; mask (n, P) bool -> (n, 2, d): [mean, log-variance]."""
        pooled = masked_mean(local, mask)
        weights = torch.softmax(self.attention(local).squeeze(2).masked_fill(~mask, float("-inf")), dim=1)
        attended = torch.bmm(weights.unsqueeze(1), local).squeeze(1)
        return torch.stack([l2norm(pooled), self.fc(attended) + self.fc2(pooled)], 1)


def match_logits(samples_a, samples_b, scale, shift, eps=1e-6):
    """-a ||z_a - z_b||_2 + b of every sample pair: (n_a, K, d), (n_b, K', d) -> (n_a, n_b, K, K').

    Distances from one matrix product, ||x||^2 + ||y||^2 - 2 x.y, with PCME's eps under the root
    (a finite gradient at distance 0).
    """
    n_a, k_a, d = samples_a.shape
    n_b, k_b, _ = samples_b.shape
    flat_a, flat_b = samples_a.reshape(n_a * k_a, d), samples_b.reshape(n_b * k_b, d)
    squared = (flat_a.square().sum(1)[:, None] + flat_b.square().sum(1)[None, :] - 2 * flat_a @ flat_b.t())
    distance = torch.sqrt(squared.clamp_min(0) + eps).view(n_a, k_a, n_b, k_b).transpose(1, 2)
    return shift - scale * distance


class PCMEHead(nn.Module):
    """PCME (Chun et al. CVPR 2021): each item a Gaussian N(mean, diag(exp(log-variance))) in the joint space.

    Training scores S[i, j] = mean over K x K sample pairs of sigmoid(-a ||z_i - z_j||_2 + b), with K
    samples z = mean + exp(log-variance / 2) eps per item (not re-normalised, as PCME), a = exp(log_scale)
    > 0 and b learned. In eval mode the score is the means' sigmoid(-a ||mu_i - mu_j|| + b): deterministic,
    one matrix product, and the ranking of the means' cosine except where float32 probabilities tie (at
    a = b = 30 every pair with a cosine above about 0.9 scores 1.0; assets/embedding_models.md).
    """

    module_name = "PCME"

    def __init__(self, embed_size, samples=7):
        super().__init__()
        self.samples = samples
        self.image_head = GaussianHead(embed_size)
        self.caption_head = GaussianHead(embed_size)
        self.log_scale = nn.Parameter(torch.tensor(math.log(PCME_INIT_SCALE)))
        self.shift = nn.Parameter(torch.tensor(PCME_INIT_SHIFT))

    def embed_images(self, regions):
        """(n, R, d) -> (n, 2, d): mean and log-variance."""
        return self.image_head(regions, all_positions(regions))

    def embed_captions(self, words, lengths):
        """(n, L, d) words (0 at padding), (n,) lengths -> (n, 2, d): mean and log-variance."""
        return self.caption_head(words, word_mask(lengths, words.size(1), words.device))

    def sample(self, gaussians):
        """(n, 2, d) -> K samples (n, K, d), drawn from torch's global generator."""
        mean, logvar = gaussians.unbind(1)
        noise = torch.randn(mean.size(0), self.samples, mean.size(1), dtype=mean.dtype, device=mean.device)
        return mean.unsqueeze(1) + torch.exp(logvar / 2).unsqueeze(1) * noise

    def logits(self, img_gaussians, cap_gaussians):
        """Match logits of every pair: (n_i, n_c, K, K) from samples in training, (n_i, n_c, 1, 1) from the
        means in eval mode."""
        if self.training:
            img_points, cap_points = self.sample(img_gaussians), self.sample(cap_gaussians)
        else:
            img_points, cap_points = img_gaussians[:, :1], cap_gaussians[:, :1]
        return match_logits(img_points, cap_points, self.log_scale.exp(), self.shift)

    def forward(self, img_gaussians, cap_gaussians):
        """(n_i, 2, d), (n_c, 2, d) -> match probabilities (n_i, n_c), in >= fp32 (see `in_score_precision`)."""
        with in_score_precision(img_gaussians) as dtype:
            return torch.sigmoid(self.logits(img_gaussians.to(dtype), cap_gaussians.to(dtype))).mean((2, 3))

    def batch(self, img_gaussians, cap_gaussians):
        """A training batch's B images' and B captions' Gaussians (B, 2, d) -> PCMEBatch for pcme_loss.PCMELoss:
        the sampled probabilities (B, B), their logits (B, B, K, K), the summed KL."""
        with in_score_precision(img_gaussians) as dtype:
            img_gaussians, cap_gaussians = img_gaussians.to(dtype), cap_gaussians.to(dtype)
            logits = self.logits(img_gaussians, cap_gaussians)
            kl = kl_to_standard_normal(img_gaussians) + kl_to_standard_normal(cap_gaussians)
            return PCMEBatch(torch.sigmoid(logits).mean((2, 3)), logits, kl)


def kl_to_standard_normal(gaussians):
    """Sum over items and dims of KL(N(mean, exp(log-variance)) || N(0, I)) of (n, 2, d): a 0-dim tensor."""
    mean, logvar = gaussians.unbind(1)
    return 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum()


class GPOGaussianHead(nn.Module):
    """PCME++'s head of one modality: local features (n, P, d) -> mean and log-variance (n, 2, d).

    As PCME++ (naver-ai/pcmepp, its text and image encoders): mean = l2norm(GPO(local)); log-variance =
    a second GPO of a second linear map of the features, not normalised. Here both start from the shared
    encoders' local features (PCME++'s variance branch starts from its backbone's, before the projection).
    """

    def __init__(self, embed_size, center=False):
        super().__init__()
        self.mean_pool = GPO()
        self.center = center
        if center:  # --pcmepp_center_means: see `centred`
            self.register_buffer("running_center", torch.zeros(embed_size))
        self.variance_fc = nn.Linear(embed_size, embed_size)
        self.variance_pool = GPO()
        init_weights(self.variance_fc)
        # As PCME's GaussianHead: sum sigma^2 starts at PCME_INIT_NOISE^2 per item (PCME++ starts sigma^2 near 1
        # per dim, which over d dims would add 2d to every pair's CSD and saturate every logit at the start).
        nn.init.constant_(self.variance_fc.bias, 2 * math.log(PCME_INIT_NOISE / math.sqrt(embed_size)))

    def forward(self, local, mask):
        """local (n, P, d), mask (n, P) bool of the real positions (first) -> (n, 2, d): [mean, log-variance]."""
        pooled = self.mean_pool(local, mask)
        if self.center:
            pooled = self.centred(pooled)
        return torch.stack([l2norm(pooled), self.variance_pool(self.variance_fc(local), mask)], 1)

    def centred(self, pooled):
        """--pcmepp_center_means (not in PCME++): the pooled vectors (n, d) less their modality's centre before the
        l2 normalisation, as BatchNorm's centring without its scale: in training the batch's mean (its gradient
        included), which also updates `running_center` (momentum CENTER_MOMENTUM); in eval mode
        `running_center`, so that an item's mean depends on it alone. GPO's top-weighted sort makes every
        dimension's pooled value positive, one shared offset per modality (cosine of two images' means 0.76,
        of two captions' 0.99 at the start); PCME++'s BCE, not invariant to it as a ranking loss is, kept it
        (assets/embedding_models.md)."""
        if not self.training:
            return pooled - self.running_center.to(pooled.dtype)
        centre = pooled.mean(0)
        with torch.no_grad():
            self.running_center.lerp_(centre.detach().to(self.running_center.dtype), CENTER_MOMENTUM)
        return pooled - centre


def negative_csd(img_gaussians, cap_gaussians):
    """-CSD of every pair: (n_i, 2, d), (n_c, 2, d) [mean, log-variance] -> (n_i, n_c).

    PCME++'s closed-form sampled distance CSD(i, j) = E ||z_i - z_j||^2 over z_i ~ N(mu_i, diag(sigma_i^2)),
    z_j ~ N(mu_j, diag(sigma_j^2)) = ||mu_i - mu_j||^2 + sum sigma_i^2 + sum sigma_j^2, computed as
    2 mu_i . mu_j - (||mu_i||^2 + sum sigma_i^2) - (||mu_j||^2 + sum sigma_j^2): one matrix product plus a
    row and a column term, each from its own item alone, so any block of a gallery is scored on its own.
    """
    mean_i, logvar_i = img_gaussians.unbind(1)
    mean_j, logvar_j = cap_gaussians.unbind(1)
    row = mean_i.square().sum(1) + logvar_i.exp().sum(1)
    column = mean_j.square().sum(1) + logvar_j.exp().sum(1)
    return 2 * (mean_i @ mean_j.t()) - row[:, None] - column[None, :]


class PCMEppHead(nn.Module):
    """PCME++ (Chun, ICLR 2024): each item a Gaussian N(mean, diag(exp(log-variance))), pooled by GPO.

    Scores: -CSD (see negative_csd), for evaluation, validation and DAA; the training logits are
    -a CSD + b, a = exp(log_scale) > 0 and b learned, from PCME++'s initial a = b = 5. No sampling.
    """

    module_name = "PCMEpp"

    def __init__(self, embed_size, init_scale=PCMEPP_INIT_SCALE, init_shift=PCMEPP_INIT_SHIFT, center=False):
        super().__init__()
        self.image_head = GPOGaussianHead(embed_size, center)
        self.caption_head = GPOGaussianHead(embed_size, center)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))

    def embed_images(self, regions):
        """(n, R, d) -> (n, 2, d): mean and log-variance."""
        return self.image_head(regions, all_positions(regions))

    def embed_captions(self, words, lengths):
        """(n, L, d) words, (n,) lengths -> (n, 2, d): mean and log-variance."""
        return self.caption_head(words, word_mask(lengths, words.size(1), words.device))

    def forward(self, img_gaussians, cap_gaussians):
        """(n_i, 2, d), (n_c, 2, d) -> -CSD (n_i, n_c), in >= fp32 (see `in_score_precision`)."""
        with in_score_precision(img_gaussians) as dtype:
            return negative_csd(img_gaussians.to(dtype), cap_gaussians.to(dtype))

    def batch(self, img_gaussians, cap_gaussians):
        """A training batch's Gaussians (B, 2, d) -> PCMEBatch for pcme_loss.PCMEppLoss: -CSD (B, B) (what DAA
        ranks), the logits -a CSD + b (B, B), and PCME++'s KL: the mean over items and dims, per modality, summed."""
        with in_score_precision(img_gaussians) as dtype:
            img_gaussians, cap_gaussians = img_gaussians.to(dtype), cap_gaussians.to(dtype)
            sims = negative_csd(img_gaussians, cap_gaussians)
            kl = sum(kl_to_standard_normal(g) / g[:, 0].numel() for g in (img_gaussians, cap_gaussians))
            return PCMEBatch(sims, self.log_scale.exp() * sims + self.shift, kl)
