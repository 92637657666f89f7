"""One training step of the original DAA code, restated from the maths: the yardstick for train.py's step.

What the original does on each of its K processes (one per GPU): its collate sorts the batch by caption
length, longest first (a stable sort); the image encoder maps every region through `fc` and l2-normalises
it; the text encoder embeds the words, applies dropout, runs the bi-GRU over the packed (sorted) captions,
averages its two directions and l2-normalises every word; the similarity loop scores one caption at a time
against every image (baselines/sim_loop.py), calling SAF's gate BatchNorm once per caption, a SyncBatchNorm:
call i normalises the gate logits of caption i of every process's batch with the statistics of all of them;
the loss is the VSE++ hinge on the hardest negatives plus DAA on the batch's score matrix; DDP averages the
processes' gradients; their norm is clipped, and Adam steps with the learning rate multiplied by K.

Here the K batches are scored in one autograd graph, so the mean of the K losses has the gradient DDP
averages, pooled statistics included. Dropout must be off (the model's Dropout modules in eval mode): the
processes' dropout masks could not be replayed. Uses the model's nn.Modules (Embedding, GRU, Linear,
BatchNorm) and, from baselines/, the caption loop and the direct DAA; nothing from model.py's batched
forward, daa_loss.py or train.py.
"""
import contextlib

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from baselines.daa_direct import asp_soft_direct
from baselines.sim_loop import l2norm, sim_one_caption_at_a_time

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the original uses


def collate(items):
    """The original's collate: dataset items (image (36, D), caption ids (L,), caption index, image index),
    in draw order -> sorted by caption length, longest first, ties in draw order: images (B, 36, D),
    captions (B, L_max) 0-padded, lengths [B], caption indices (B,), image indices (B,)."""
    items = sorted(items, key=lambda item: len(item[1]), reverse=True)
    images, captions, caption_ids, image_ids = zip(*items)
    lengths = [len(caption) for caption in captions]
    padded = torch.zeros(len(captions), lengths[0], dtype=torch.long)
    for row, caption in enumerate(captions):
        padded[row, :len(caption)] = caption
    return torch.stack(images), padded, lengths, torch.tensor(caption_ids), torch.tensor(image_ids)


def encode(model, images, captions, lengths):
    """A sorted batch -> region embeddings (B, 36, d) and word embeddings (B, L_max, d) (bi-GRU, both
    l2-normalised; words past a caption's length are 0)."""
    regions = l2norm(model.img_enc.fc(images), dim=-1)
    words = model.txt_enc.dropout(model.txt_enc.embed(captions))
    packed, _ = model.txt_enc.cap_rnn(pack_padded_sequence(words, lengths, batch_first=True))
    words, _ = pad_packed_sequence(packed, batch_first=True)
    half = words.size(2) // 2
    return regions, l2norm((words[:, :, :half] + words[:, :, half:]) / 2, dim=-1)


@contextlib.contextmanager
def buffers_kept(module):
    """The pass inside updates copies of the module's buffers, which are dropped on exit: its BatchNorm
    updates are another process's (every process keeps its own buffers; rank 0's are the ones checkpoints
    hold). Copies, not values restored in place: the pass's autograd graph holds the buffers it used."""
    kept = [(owner, name, buffer) for owner in module.modules() for name, buffer in owner.named_buffers(recurse=False)]
    for owner, name, buffer in kept:
        setattr(owner, name, buffer.clone())
    yield
    for owner, name, buffer in kept:
        setattr(owner, name, buffer)


def score_matrices(sim_enc, embeddings):
    """K processes' (regions, words, lengths) -> their K score matrices (n_i, n_c), SAF's gate synchronised.

    Process k's BatchNorm call for caption i is one BatchNorm over the concatenated gate logits of caption
    i of every process: their pooled mean and biased variance normalise, and the pooled count gives the
    running variance its unbiased factor, as SyncBatchNorm. The other processes' logits come from a first
    pass that only records them; they are the same function of the weights, so the gradient that flows
    through them is the pooled statistics' gradient. Only process 0's pass keeps its BatchNorm updates.
    """
    received = [[] for _ in embeddings]  # received[k][i]: process k's gate logits of its caption i
    if len(embeddings) > 1 and sim_enc.module_name == "SAF":
        with buffers_kept(sim_enc):
            for k, args in enumerate(embeddings):
                sim_one_caption_at_a_time(sim_enc, *args, gate_bn=lambda i, x, k=k: received[k].append(x) or x)

    def synchronised(k):
        def gate_bn(i, logits):
            parts = [logits if j == k else received[j][i] for j in range(len(embeddings))]
            out = sim_enc.SAF_module.bn(torch.cat([part.reshape(1, 1, -1) for part in parts], 2))
            start = sum(part.numel() for part in parts[:k])
            return out[..., start:start + logits.numel()].reshape(logits.shape)
        return gate_bn

    matrices = []
    for k, args in enumerate(embeddings):
        with buffers_kept(sim_enc) if k else contextlib.nullcontext():
            matrices.append(sim_one_caption_at_a_time(sim_enc, *args, gate_bn=synchronised(k)))
    return matrices


def contrastive_loss(S, margin):
    """VSE++ hinge on the hardest negatives: S (B, B), images x captions, positive pairs on the diagonal."""
    positive = S.diag()
    negative = ~torch.eye(len(S), dtype=torch.bool)
    cost_caption = ((margin + S - positive[:, None]).clamp(min=0) * negative).max(1)[0]  # each image's worst caption
    cost_image = ((margin + S - positive[None, :]).clamp(min=0) * negative).max(0)[0]  # each caption's worst image
    return cost_caption.sum() + cost_image.sum()


def original_step(model, batches, relevance, learning_rate, daa_weight, daa_variant, margin=0.2, grad_clip=2.0,
                  daa_temp=0.001):
    """One step of K processes, each on its batch: `batches` holds per process a list of dataset items in
    draw order; relevance(image indices, caption indices) -> M (B, B). The model's parameters and buffers
    (rank 0's) change in place, from a fresh Adam state.

    Returns (per process {loss, contrastive_loss, daa_i2t_loss, daa_t2i_loss} 0-dim tensors, the gradients
    {parameter name: tensor} before clipping (DDP's mean over the processes), the gradient norm).
    """
    dtype = next(model.parameters()).dtype
    embeddings, relevances = [], []
    for images, captions, lengths, caption_ids, image_ids in map(collate, batches):
        embeddings.append((*encode(model, images.to(dtype), captions, lengths), lengths))
        relevances.append(torch.as_tensor(relevance(image_ids.numpy(), caption_ids.numpy()), dtype=dtype))
    losses = []
    for S, M in zip(score_matrices(model.sim_enc, embeddings), relevances):
        hinge = contrastive_loss(S, margin)
        i2t = daa_weight * (1 - asp_soft_direct(S, M, daa_temp, daa_variant))
        t2i = daa_weight * (1 - asp_soft_direct(S.t(), M.t(), daa_temp, daa_variant))
        losses.append({"loss": hinge + i2t + t2i, "contrastive_loss": hinge, "daa_i2t_loss": i2t, "daa_t2i_loss": t2i})
    model.zero_grad(set_to_none=True)
    (sum(terms["loss"] for terms in losses) / len(losses)).backward()

    params = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    grads = {name: p.grad.clone() for name, p in params}
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for _, p in params))
    scale = min(1.0, grad_clip / (float(norm) + 1e-6))  # clip_grad_norm_: never scaled up
    lr = learning_rate * len(batches)
    (beta1, beta2), t = ADAM_BETAS, 1
    with torch.no_grad():
        for _, p in params:
            g = p.grad * scale
            m, v = (1 - beta1) * g, (1 - beta2) * g * g  # the moments after one update from 0
            p -= lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + ADAM_EPS)
    return losses, grads, norm
