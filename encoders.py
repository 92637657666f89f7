"""The image and text encoders that every model shares, and the original's norms and initialisation.

SGR/SAF (model.py) score the encoders' regions and words pair by pair; the embedding models
(embedding_models.py) pool them into one vector (or Gaussian) per item. Same modules, parameter names and
initialisation as the original SGRAF, so its checkpoints' img_enc and txt_enc load.

Shapes: n items of R = 36 regions or L words, d = embed_size.
"""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

DROPOUT = 0.4  # the original's, of the text encoder and of SGR/SAF's self-attention


def representable_eps(eps, dtype):
    """`eps`, or the smallest normal number of `dtype` where `eps` is below it: in fp16 (smallest normal
    6.1e-5) the original's 1e-8 and 1e-12 round to 0, and a zero vector's 0 / (0 + eps) becomes NaN.
    fp32, fp64 and bf16 keep `eps` as it is (their smallest normal is ~1e-38)."""
    return max(eps, torch.finfo(dtype).tiny)


def l1norm(X, dim, eps=1e-8):
    """X / (sum |X| + eps) along dim (the original's eps placement)."""
    total = X.abs().sum(dim=dim, keepdim=True)
    return X / (total + representable_eps(eps, total.dtype))


def l2norm(X, dim=-1, eps=1e-8):
    """X / (||X||_2 + eps) along dim (the original's eps placement; one fused norm, and a zero vector
    gets a zero gradient instead of the NaN of sqrt'(0))."""
    norm = torch.linalg.vector_norm(X, dim=dim, keepdim=True)
    return X / (norm + representable_eps(eps, norm.dtype))


def masked_mean(local, mask):
    """Mean over the real positions: local (n, P, d) with 0 at padded positions, mask (n, P) -> (n, d)."""
    return local.sum(1) / mask.sum(1, keepdim=True).to(local.dtype)


def init_weights(module):
    """The original's init: every Linear Xavier-uniform with bias 0, every BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EncoderImage(nn.Module):
    """Region features (n, R, img_dim) -> region embeddings (n, R, d), l2-normalised unless no_imgnorm."""

    def __init__(self, img_dim, embed_size, no_imgnorm=False):
        super().__init__()
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        init_weights(self)

    def forward(self, images):
        emb = self.fc(images)
        return emb if self.no_imgnorm else l2norm(emb, dim=-1)


class EncoderText(nn.Module):
    """Word ids (n, L) + lengths (n,) -> word embeddings (n, L, d); padded positions are exactly 0.

    Packing keeps padded words out of the GRU, so neither direction sees them; the two directions of
    the bi-GRU are averaged.
    """

    def __init__(self, vocab_size, word_dim, embed_size, num_layers, bi_gru=True, no_txtnorm=False):
        super().__init__()
        self.no_txtnorm = no_txtnorm
        self.bi_gru = bi_gru
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(DROPOUT)
        self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions, lengths):
        words = self.dropout(self.embed(captions))
        lengths = torch.as_tensor(lengths).cpu()
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.cap_rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=captions.size(1))
        if self.bi_gru:
            half = out.size(2) // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return out if self.no_txtnorm else l2norm(out, dim=-1)
