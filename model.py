"""SGR and SAF image-text similarity models (SGRAF, Diao et al. AAAI 2021), as trained by DAA, and three
embedding models, VSE, PCME and PCME++, whose every image and caption is one point (or one Gaussian) in a
joint space.

Same modules, parameter names and initialisation as the original, so its checkpoints load. What differs
is how the (n_images x n_captions) similarity matrix is computed: the original loops over captions
(each one repeated n_images times); here every pair is scored at once, in chunks of captions of similar
length, with the padded words masked so that a caption scores the same whatever else is in the batch.

The embedding models reuse the same image and text encoders (encoders.py); their third part (`sim_enc`,
the "head", embedding_models.py) pools the regions and words into one vector per item, so that a gallery is
scored by one matrix product instead of a network run on every pair. SimilarityModel builds any of the five.

Shapes: n_i images of R = 36 regions, n_c captions of at most L words, d = embed_size, s = sim_dim.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from embedding_models import EMBEDDING_MODULES, PCMEPP_INIT_SCALE, PCMEPP_INIT_SHIFT, PCMEHead, PCMEppHead, VSEHead
from encoders import DROPOUT, EncoderImage, EncoderText, init_weights, l1norm, l2norm, masked_mean
from errors import InputError
from layout import REGIONS

SMOOTH = 9.0  # lambda of the SCAN text-to-image attention
# Transient memory budget of `EncoderSimilarity`: floats of one chunk's (n_i, words, d) context tensor
# (32 MB: small enough to stay in cache-friendly sizes on CPU, where bigger chunks measured slower).
MAX_ELEMENTS = 2 ** 23
# On a GPU the same budget is launch-bound (scoring at full dims ran about one caption per chunk, a training
# forward ~40 small chunks): there a chunk's context may take this share of the device's memory instead
# (1/128: 640 MB of an 80 GB GPU, ~2^27 floats, a training batch of 128 in a few chunks).
GPU_MEMORY_SHARE = 128
ONEDNN = torch.backends.mkldnn.is_available()  # `linear` uses its kernel on the CPU


def chunk_budget(device):
    """Elements of one chunk's (n_i, words, d) context in `EncoderSimilarity` on `device`: MAX_ELEMENTS on a
    CPU; on a GPU 1 / GPU_MEMORY_SHARE of its memory in fp32 floats (never less than MAX_ELEMENTS)."""
    if device.type != "cuda":
        return MAX_ELEMENTS
    return max(MAX_ELEMENTS, torch.cuda.get_device_properties(device).total_memory // (4 * GPU_MEMORY_SHARE))


def linear(x, weight, bias=None, relu=False):
    """F.linear, then ReLU when `relu`: x (..., in), weight (out, in), bias (out,) -> (..., out).

    On the CPU, in fp32, outside autograd and autocast (scoring) it calls oneDNN's linear kernel, ReLU
    fused: at the model's shapes it measured 1.2-1.3x MKL's addmm (one thread), and the ReLU runs on each
    output block while it is in cache instead of in a second pass over the whole output. Under
    torch.compile, F.linear: the compiler chooses its own kernels (and cannot lower this one's eager call).
    """
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and ONEDNN
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    out = F.linear(x, weight, bias)
    return torch.relu_(out) if relu else out


def strip_module_prefix(state_dict):
    """Drop DDP's leading 'module.' from every key (the original's checkpoints, and ours, carry it)."""
    return {(key[len("module."):] if key.startswith("module.") else key): value for key, value in state_dict.items()}


class VisualSA(nn.Module):
    """Self-attention global image: regions (n, R, d) -> (n, d), l2-normalised."""

    def __init__(self, embed_dim, dropout_rate=DROPOUT, num_region=REGIONS):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(num_region),
                                             nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        init_weights(self)

    def forward(self, local):
        l_emb = self.embedding_local(local)
        g_emb = self.embedding_global(local.mean(1))
        weights = torch.softmax(self.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(2), dim=1)
        return l2norm(torch.bmm(weights.unsqueeze(1), local).squeeze(1), dim=-1)


class TextSA(nn.Module):
    """Self-attention global text over each caption's real words: (n, L, d), mask (n, L) -> (n, d)."""

    def __init__(self, embed_dim, dropout_rate=DROPOUT):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        init_weights(self)

    def forward(self, local, mask):
        """`local` must be 0 at padded words (see masked_mean)."""
        l_emb = self.embedding_local(local)
        g_emb = self.embedding_global(masked_mean(local, mask))
        logits = self.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(2)
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        return l2norm(torch.bmm(weights.unsqueeze(1), local).squeeze(1), dim=-1)


class GraphReasoning(nn.Module):
    """One step of similarity graph reasoning over the nodes (..., N, s) of each (image, caption) pair."""

    def __init__(self, sim_dim):
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        init_weights(self)

    def edge_weights(self):
        """The query and key projections folded into one (s + 1, s) weight and (s + 1,) bias (see forward)."""
        query_w, key_w = self.graph_query_w, self.graph_key_w
        weight = torch.cat([key_w.weight.t() @ query_w.weight, (key_w.bias @ query_w.weight).unsqueeze(0)])
        bias = torch.cat([query_w.bias @ key_w.weight, (query_w.bias @ key_w.bias).view(1)])
        return weight, bias

    def forward(self, nodes, key_mask, edge_weights=None, first_only=False):
        """nodes (..., N, s), key_mask (..., N) bool (padded nodes are never keys) -> (..., N or 1, s).

        edge_weights: `edge_weights()`, computed once for every chunk of a scoring pass, whose probe and
        offset then come out of one product. None (training): computed here, per chunk, and the offset in a
        product of its own, as before scoring was folded: one (s + 1)-column product sums in another order,
        and a one-ulp change compounds over a run (SGR's saved runs would no longer repeat bit for bit).

        Edge logits q_n . k_m = (W_q x_n + b_q) . (W_k x_m + b_k) = p_n . x_m + q_n . b_k with
        p_n = W_k^T q_n = (W_k^T W_q) x_n + W_k^T b_q: one s x s product per node instead of two; q_n . b_k
        comes out of the same product as its last column. (It does not depend on the key and cancels in
        the softmax; it is kept, for a few flops, so that b_k gets its gradient as in the original and DDP
        sees every parameter used.) `first_only` updates node 0 alone (all SGR reads after its last step).
        """
        queries = nodes[..., :1, :] if first_only else nodes
        s = nodes.size(-1)
        if edge_weights is None:
            weight, bias = self.edge_weights()
            probe, offset = F.linear(queries, weight[:s], bias[:s]), F.linear(queries, weight[s:], bias[s:])
        else:
            probe = linear(queries, *edge_weights)  # (..., N or 1, s + 1)
            probe, offset = probe[..., :s], probe[..., s:]
        logits = torch.matmul(probe, nodes.transpose(-1, -2)).add_(offset)
        edges = torch.softmax(logits.masked_fill_(~key_mask.unsqueeze(-2), float("-inf")), dim=-1)
        return linear(torch.matmul(edges, nodes), self.sim_graph_w.weight, self.sim_graph_w.bias, relu=True)


class _SumOverProcesses(torch.autograd.Function):
    """A tensor summed over the processes of `group`; its backward sums the gradients over them as well.

    Every process's loss depends on the sum, so the gradient of one process's share is the sum of all
    processes' gradients with respect to the sum: the terms SyncBatchNorm's backward all-reduces.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


class AttentionFiltration(nn.Module):
    """Gate-based filtration of the alignment nodes of each pair, BatchNorm1d(1) on the gate logits.

    In training the original calls this BatchNorm once per caption: caption c's gate logits (all images
    x its real nodes) are normalised with their own batch statistics, and the running statistics move
    once per caption, in caption order. With K processes its SyncBatchNorm pools caption i's statistics
    with the i-th caption of every other process's batch, and its backward pass sums the statistics'
    gradients over the processes. `process_group` does the same here (train.py sets it for K processes;
    None: this process alone). The BatchNorm module itself is never called, only its parameters and
    buffers are used, so converting it to SyncBatchNorm changes nothing.
    """

    def __init__(self, sim_dim):
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        self.process_group = None
        init_weights(self)

    def uses_batch_stats(self):
        return self.bn.training or self.bn.running_mean is None

    def gate_logits(self, nodes):
        """nodes (n_i, n, N, s) -> gate logits (n_i, n, N), in >= fp32 (the statistics too, as autocast's BN)."""
        logits = self.attn_sim_w(nodes).squeeze(-1)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def batch_statistics(self, logits, node_masks, positions):
        """Each caption's mean and biased variance of its gate logits, pooled over `process_group`.

        logits: per chunk of captions (n_i, n_k, N_k); node_masks: per chunk (n_k, N_k) bool, the real
        nodes; positions: per chunk the captions' places in the batch (n_k,), together 0..n_c-1 ->
        mean (n_c,), var (n_c,) in batch order, differentiable. Caption i is pooled with the i-th caption
        of every process (all processes have batches of n_c captions). In training the running
        statistics are updated as the original's n_c BatchNorm calls update them (unbiased variance of
        the pooled count).
        """
        inverse = torch.argsort(torch.cat(positions))
        reals = [mask.to(x.dtype) for x, mask in zip(logits, node_masks)]

        def pooled(per_chunk):  # per-chunk sums (n_k, ...) -> (n_c, ...) in batch order, summed over processes
            total = torch.cat(per_chunk)[inverse]
            return total if self.process_group is None else _SumOverProcesses.apply(total, self.process_group)

        count, total = pooled([torch.stack([x.size(0) * real.sum(1), (x * real).sum((0, 2))], 1)
                               for x, real in zip(logits, reals)]).unbind(1)
        mean = total / count
        var = pooled([((x - mean[p][:, None]).pow(2) * real).sum((0, 2))
                      for x, real, p in zip(logits, reals, positions)]) / count
        if self.bn.training and self.bn.track_running_stats:
            self.update_running_stats(mean.detach(), (var * count / (count - 1)).detach())
        return mean, var

    def forward(self, nodes, node_mask, logits=None, stats=None):
        """nodes (n_i, n, N, s), node_mask (n, N) -> filtered vectors (n_i, n, s), l2-normalised.

        `stats`: (mean, var), each (n,), these captions' batch statistics (from `batch_statistics`, with
        the `logits` they were computed from); None: the running statistics.
        """
        bn = self.bn
        if logits is None:
            logits = self.gate_logits(nodes)
        mean, var = (bn.running_mean, bn.running_var) if stats is None else (stats[0][:, None], stats[1][:, None])
        gates = (logits - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            gates = gates * bn.weight + bn.bias
        gates = torch.sigmoid(gates) * node_mask.to(gates.dtype)
        vectors = torch.matmul(l1norm(gates, dim=-1).unsqueeze(-2), nodes).squeeze(-2)
        return l2norm(vectors, dim=-1)

    @torch.no_grad()
    def update_running_stats(self, means, variances):
        """Running stats after one BatchNorm update per caption, in order (closed form), stats (K,)."""
        bn = self.bn
        k = means.numel()
        if bn.momentum is None:  # cumulative average: r = (n0 r0 + sum of stats) / (n0 + K)
            n0 = bn.num_batches_tracked.to(means.dtype)
            bn.running_mean.copy_((n0 * bn.running_mean + means.sum()) / (n0 + k))
            bn.running_var.copy_((n0 * bn.running_var + variances.sum()) / (n0 + k))
        else:  # r_K = (1-m)^K r0 + sum_k m (1-m)^(K-k) stat_k
            m = bn.momentum
            decay = (1 - m) ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=means.device)
            weights = (m * decay).to(means.dtype)
            bn.running_mean.copy_((1 - m) ** k * bn.running_mean + (weights * means).sum())
            bn.running_var.copy_((1 - m) ** k * bn.running_var + (weights * variances).sum())
        bn.num_batches_tracked.add_(k)


class _LocalAlignment(torch.autograd.Function):
    """y = W ((l2norm(a^T V) - w)^2) + b without keeping any (n_i, words, d) tensor for backward.

    aT (n_i, R, W) attention of each word over the regions, V (n_i, R, d) regions, w (W, d) words,
    weight (s, d), bias (s,), scoring (True where no gradient is wanted: `linear`'s kernel) -> (n_i, W, s).
    The context a^T V is recomputed in backward from the small attention (R = 36 floats per pair-word
    instead of d), which is what bounds the training memory.
    """

    @staticmethod
    def forward(ctx, aT, V, w, weight, bias, scoring):
        buf = torch.bmm(aT.transpose(1, 2), V)  # context (n_i, W, d)
        # an fp16 context's norm in fp32: in fp16 the eps below would round to 0 (and the backward's clamp too),
        # and an all-zero context gave NaN; other dtypes compute exactly as before
        norm = torch.linalg.vector_norm(buf, dim=-1, keepdim=True,
                                        dtype=torch.float32 if buf.dtype == torch.float16 else buf.dtype)
        buf.div_(norm + 1e-8).sub_(w).square_()
        ctx.save_for_backward(aT, V, w, weight, norm)
        # Training keeps F.linear (MKL's product, the caption loop's): oneDNN's sums in another order, and a
        # one-ulp change of a score can flip DAA's min/max ratio at a near-tie, changing the gradient.
        return linear(buf, weight, bias) if scoring else F.linear(buf, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        aT, V, w, weight, norm = ctx.saved_tensors
        buf = torch.bmm(aT.transpose(1, 2), V).div_(norm + 1e-8).sub_(w)  # e = c - w
        sq = buf.square()
        s, d = weight.shape
        grad_weight = grad.reshape(-1, s).t() @ sq.reshape(-1, d)
        grad_bias = grad.sum((0, 1))
        ge = torch.matmul(grad, weight, out=sq)  # d/de of W e^2 is 2 e (W^T g)
        ge.mul_(buf).mul_(2)
        grad_w = -ge.sum(0)
        c = buf.add_(w)
        # c = u / (|u| + eps)  =>  du = dc / (|u| + eps) - c (dc . c) / |u|
        dot = (ge * c).sum(-1, keepdim=True)
        gu = ge.div_(norm + 1e-8).addcmul_(c, dot / norm.clamp_min(1e-12), value=-1)
        grad_aT = torch.bmm(V, gu.transpose(1, 2))
        grad_V = torch.bmm(aT, gu)
        return grad_aT, grad_V, grad_w, grad_weight, grad_bias, None


def local_alignment(aT, V, w, weight, bias):
    """`_LocalAlignment` in one dtype (autocast's where it is on, as the matmuls inside would run); scoring
    (no gradient wanted) where autograd would record nothing."""
    device = V.device.type
    scoring = not (torch.is_grad_enabled() and any(t.requires_grad for t in (aT, V, w, weight, bias)))
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _LocalAlignment.apply(*(t.to(dtype) for t in (aT, V, w, weight, bias)), scoring)
    dtype = V.dtype
    return _LocalAlignment.apply(*(t.to(dtype) for t in (aT, V, w, weight, bias)), scoring)


class EncoderSimilarity(nn.Module):
    """Scores of every (image, caption) pair: SCAN local + self-attention global alignments, then SGR or SAF."""

    def __init__(self, embed_size, sim_dim, module_name="SGR", sgr_step=3):
        super().__init__()
        self.module_name = module_name
        self.max_elements = None  # chunk budget; None: chunk_budget of the device the forward runs on
        self.v_global_w = VisualSA(embed_size, DROPOUT, REGIONS)
        self.t_global_w = TextSA(embed_size, DROPOUT)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        if module_name == "SGR":
            self.SGR_module = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_step)])
        elif module_name == "SAF":
            self.SAF_module = AttentionFiltration(sim_dim)
        else:
            raise ValueError(f"module_name must be SGR or SAF, not {module_name!r}")
        init_weights(self)

    @staticmethod
    def _zero_padding(cap_embs, lengths, zero_padded=False):
        """cap_embs (n_c, L, d) with every padded word set to 0 (as it is when the caller says it is already:
        zero_padded, no masking copy), and the word mask (n_c, L) bool on the CPU."""
        L = cap_embs.shape[1]
        lengths = torch.as_tensor(lengths).cpu()
        if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > L):
            raise ValueError(f"caption lengths must be in 1..{L}")
        mask = torch.arange(L) < lengths[:, None]
        return cap_embs if zero_padded else cap_embs.masked_fill(~mask.to(cap_embs.device).unsqueeze(2), 0), mask

    def caption_globals(self, cap_embs, lengths):
        """TextSA's global vector of each caption: (n_c, L, d), lengths (n_c,) -> (n_c, d), as `forward`
        computes it for the same block (two-stage scoring computes it once per caption, see forward)."""
        cap_embs, mask = self._zero_padding(cap_embs, lengths)
        return self.t_global_w(cap_embs, mask.to(cap_embs.device))

    def folded_edge_weights(self):
        """SGR's GraphReasoning.edge_weights() of every step (scoring: fold them once for many calls)."""
        return [module.edge_weights() for module in self.SGR_module]

    def forward(self, img_embs, cap_embs, lengths, img_glo=None, cap_glo=None, zero_padded=False, edge_weights=None):
        """img_embs (n_i, R, d), cap_embs (n_c, L, d), lengths (n_c,) -> scores (n_i, n_c) in (0, 1).

        img_glo (n_i, d), cap_glo (n_c, d): the items' global vectors (VisualSA / caption_globals) when the
        caller has them already; in eval mode they depend on their item alone, so a pair scored with the
        vectors of another call (two-stage scoring reuses each item's for all its pairs) scores the same.
        None: computed here from this block (always so in training, where VisualSA's BatchNorm uses the
        batch's statistics). zero_padded: the caller's cap_embs are 0 at every padded word already (no
        masking copy of them). edge_weights: SGR's folded_edge_weights() when the caller scores many small
        blocks with the same weights (two-stage scoring calls once per image; folding is 100 MFLOP a call).

        Captions are sorted by length and scored in chunks of at most `max_elements` (default: chunk_budget of
        the device) // (n_i d) words,
        so the transient (n_i, words, d) context stays bounded and chunks carry little padding. SAF in
        training gates no caption before the gate statistics of every caption (of every process) are
        known, so its chunks keep their alignment nodes until then (autograd keeps them anyway).
        """
        n_i, _, d = img_embs.shape
        n_c = cap_embs.shape[0]
        lengths = torch.as_tensor(lengths).cpu()
        cap_embs, mask = self._zero_padding(cap_embs, lengths, zero_padded)
        if img_glo is None:
            img_glo = self.v_global_w(img_embs)  # (n_i, d)
        if cap_glo is None:
            cap_glo = self.t_global_w(cap_embs, mask.to(cap_embs.device))  # (n_c, d)

        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_lengths = lengths[order].tolist()
        presorted = bool((order == torch.arange(n_c)).all())  # chunks are then slices, not gathered copies
        saf_batch_stats = self.module_name == "SAF" and self.SAF_module.uses_batch_stats()
        if self.module_name == "SGR":  # folded once for all chunks when scoring (see GraphReasoning.forward)
            if torch.is_grad_enabled():
                edge_weights = [None] * len(self.SGR_module)
            elif edge_weights is None:
                edge_weights = self.folded_edge_weights()
        budget = chunk_budget(img_embs.device) if self.max_elements is None else self.max_elements
        scores, pending, start = [], [], 0
        while start < n_c:
            width = sorted_lengths[start]  # the longest caption of the chunk
            stop = min(n_c, start + max(1, budget // max(1, n_i * width * d)))
            idx = order[start:stop].to(cap_embs.device)
            words = cap_embs[start:stop, :width] if presorted else cap_embs[idx, :width]
            nodes, node_mask = self._nodes(img_embs, img_glo, words,
                                           mask[order[start:stop], :width].to(cap_embs.device), cap_glo[idx])
            if saf_batch_stats:
                pending.append((idx, nodes, node_mask, self.SAF_module.gate_logits(nodes)))
            elif self.module_name == "SGR":
                for step, (module, weights) in enumerate(zip(self.SGR_module, edge_weights)):
                    nodes = module(nodes, node_mask, weights, first_only=step == len(self.SGR_module) - 1)
                scores.append(self._score(nodes[:, :, 0]))
            else:
                scores.append(self._score(self.SAF_module(nodes, node_mask)))
            start = stop
        if pending:
            positions, nodes, node_masks, logits = zip(*pending)
            mean, var = self.SAF_module.batch_statistics(logits, node_masks, positions)
            scores = [self._score(self.SAF_module(x, m, g, (mean[p], var[p]))) for p, x, m, g in pending]
        if not scores:
            return img_embs.new_zeros(n_i, 0)
        return torch.cat(scores, 1)[:, torch.argsort(order).to(img_embs.device)]

    def _nodes(self, img_embs, img_glo, words, mask, cap_glo):
        """Alignment nodes of n captions padded to one width: words (n, Lc, d) zero-padded, mask (n, Lc) ->
        nodes (n_i, n, 1 + Lc, s) (node 0 the global alignment) and their mask (n, 1 + Lc)."""
        n_i, n_r, d = img_embs.shape
        n, width, _ = words.shape
        flat_words = words.reshape(n * width, d)
        # SCAN attention, laid out (n_i, R, words): one GEMM for every region x every word.
        attn = F.leaky_relu((img_embs.reshape(n_i * n_r, d) @ flat_words.t()).view(n_i, n_r, n, width), 0.1)
        attn = l2norm(attn.masked_fill(~mask, 0), dim=-1)  # over each caption's real words
        attn = torch.softmax(attn * SMOOTH, dim=1).view(n_i, n_r, n * width)
        sim_loc = local_alignment(attn, img_embs, flat_words, self.sim_tranloc_w.weight, self.sim_tranloc_w.bias)
        sim_loc = l2norm(sim_loc, dim=-1)
        sim_glo = l2norm(linear((img_glo.unsqueeze(1) - cap_glo.unsqueeze(0)).pow(2), self.sim_tranglo_w.weight,
                                self.sim_tranglo_w.bias), dim=-1)
        nodes = torch.cat([sim_glo.unsqueeze(2), sim_loc.view(n_i, n, width, -1)], 2)
        return nodes, torch.cat([mask.new_ones(n, 1), mask], 1)

    def _score(self, vectors):
        """(n_i, n, s) -> scores (n_i, n).

        The score head stays in >= fp32 under autocast: bf16 logits (8 bits of mantissa) would tie many
        pairs that fp32 ranks apart, and R@K and ASP are computed from the ranks of these scores.
        """
        with torch.autocast(vectors.device.type, enabled=False):
            vectors = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
            return torch.sigmoid(self.sim_eval_w(vectors)).squeeze(-1)


class SimilarityModel(nn.Module):
    """Image encoder + text encoder + similarity encoder (SGR/SAF) or embedding head (VSE/PCME/PCMEpp), built
    from the training options `opt`.

    `embedding` is True for VSE, PCME and PCMEpp: encode_images/encode_captions then give one row per item
    ((n, d), PCME and PCMEpp (n, 2, d): mean and log-variance) and a gallery is scored by matrix products.
    """

    def __init__(self, opt):
        super().__init__()
        self.module_name = opt.module_name
        self.embedding = opt.module_name in EMBEDDING_MODULES
        self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, opt.no_imgnorm)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers,
                                   opt.bi_gru, opt.no_txtnorm)
        if opt.module_name == "VSE":
            self.sim_enc = VSEHead(opt.vse_pool)
        elif opt.module_name == "PCME":
            self.sim_enc = PCMEHead(opt.embed_size, opt.pcme_samples)
        elif opt.module_name == "PCMEpp":
            self.sim_enc = PCMEppHead(opt.embed_size, getattr(opt, "pcmepp_init_scale", PCMEPP_INIT_SCALE),
                                      getattr(opt, "pcmepp_init_shift", PCMEPP_INIT_SHIFT),
                                      getattr(opt, "pcmepp_center_means", False))
        else:
            self.sim_enc = EncoderSimilarity(opt.embed_size, opt.sim_dim, opt.module_name, opt.sgr_step)

    def encode_images(self, images):
        """(n, R, img_dim) -> (n, R, d); embedding models: (n, d) or PCME's and PCMEpp's (n, 2, d)."""
        regions = self.img_enc(images)
        return self.sim_enc.embed_images(regions) if self.embedding else regions

    def encode_captions(self, captions, lengths):
        """(n, L) word ids, (n,) lengths -> (n, L, d), 0 at padded words; embedding models: (n, d) or (n, 2, d)."""
        words = self.txt_enc(captions, lengths)
        return self.sim_enc.embed_captions(words, lengths) if self.embedding else words

    def similarity(self, img_embs, cap_embs, lengths, img_glo=None, cap_glo=None, zero_padded=False,
                   edge_weights=None):
        """Encoded images and captions (any block of them; lengths (n_c,)) -> (n_i, n_c) scores.

        SGR/SAF: img_glo, cap_glo, the items' global vectors when known, zero_padded, SGR's edge_weights (see
        EncoderSimilarity.forward)."""
        if self.embedding:
            return self.sim_enc(img_embs, cap_embs)
        return self.sim_enc(img_embs, cap_embs, lengths, img_glo, cap_glo, zero_padded, edge_weights)

    def forward(self, images, captions, lengths):
        """A batch of B images and their B captions -> (B, B) scores, rows images, columns captions.

        PCME and PCMEpp return a PCMEBatch (scores, their match logits, the KL term) for their loss.
        """
        img_embs, cap_embs = self.encode_images(images), self.encode_captions(captions, lengths)
        if self.module_name in ("PCME", "PCMEpp"):
            return self.sim_enc.batch(img_embs, cap_embs)
        return self.similarity(img_embs, cap_embs, lengths)

    def state_dicts(self):
        """[img_enc, txt_enc, sim_enc] state dicts, the original checkpoint's 'model' entry."""
        return [self.img_enc.state_dict(), self.txt_enc.state_dict(), self.sim_enc.state_dict()]

    def load_state_dicts(self, state_dicts, source):
        """Load [img_enc, txt_enc, sim_enc] state dicts (keys with or without DDP's 'module.'); a mismatch is
        an InputError naming `source`, the file they came from."""
        try:
            for module, state in zip((self.img_enc, self.txt_enc, self.sim_enc), state_dicts, strict=True):
                module.load_state_dict(strip_module_prefix(state))
        except RuntimeError as err:
            detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
            raise InputError(f"{source}: weights do not fit the model ({detail[:300]})") from None

    @classmethod
    def from_checkpoint(cls, ckpt, path, vocab_size=None):
        """The model a loaded checkpoint holds (checkpoint.load_checkpoint's dict, read from `path`), in eval
        mode, built from its options; `vocab_size`, when given, must match its embedding's rows."""
        embed = strip_module_prefix(ckpt["model"][1]).get("embed.weight")
        if embed is None:
            raise InputError(f"{path}: text encoder has no 'embed.weight'")
        if vocab_size is not None and vocab_size != embed.shape[0]:
            raise InputError(f"{path}: vocabulary has {vocab_size} words but the checkpoint's embedding has "
                             f"{embed.shape[0]} rows (wrong --vocab_path?)")
        model = cls(argparse.Namespace(**dict(vars(ckpt["opt"]), vocab_size=embed.shape[0])))
        model.load_state_dicts(ckpt["model"], path)
        return model.eval()
