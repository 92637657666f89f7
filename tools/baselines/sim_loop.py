"""The original SGRAF similarity forward: one caption at a time, each repeated for every image.

Runs on the submodules and weights of a `model.EncoderSimilarity`, calling its Linear / BatchNorm layers
exactly as the original does (plain query and key projections in SGR, SAF's BatchNorm1d(1) called once
per caption), so its scores and, in training mode, its BatchNorm running statistics are the reference
for the batched `EncoderSimilarity.forward`. Used by tests/test_model.py and the benchmark.

Its constants and normalisations are written out here from the original's formulas, not imported from
model.py: a yardstick that shared them would move with the code it checks.
"""
import torch
import torch.nn.functional as F

SMOOTH = 9.0  # lambda of the SCAN text-to-image attention (a literal in the original)
LEAKY_SLOPE = 0.1  # LeakyReLU of the SCAN attention logits
EPS = 1e-8  # added to the norm, after the square root, as the original does


def l1norm(X, dim):
    """X / (sum |X| + eps) along dim."""
    return torch.div(X, torch.abs(X).sum(dim=dim, keepdim=True) + EPS)


def l2norm(X, dim):
    """X / (sqrt(sum X^2) + eps) along dim."""
    return torch.div(X, torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _self_attention(sa, local, raw_global):
    """VisualSA / TextSA of the original: local (n, L, d), raw_global (n, d) -> (n, d)."""
    l_emb = sa.embedding_local(local)
    g_emb = sa.embedding_global(raw_global).unsqueeze(1).repeat(1, l_emb.size(1), 1)
    weights = torch.softmax(sa.embedding_common(l_emb * g_emb).squeeze(2), dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(1), dim=-1)


def _scan_attention(words, regions):
    """Text-to-image SCAN attention: words (n, L, d), regions (n, R, d) -> attended contexts (n, L, d)."""
    attn = F.leaky_relu(torch.bmm(regions, words.transpose(1, 2)), LEAKY_SLOPE)  # (n, R, L)
    attn = l2norm(attn, dim=2)
    attn = torch.softmax(attn.transpose(1, 2) * SMOOTH, dim=2)  # (n, L, R)
    return l2norm(torch.bmm(attn, regions), dim=-1)


def sim_one_caption_at_a_time(sim_enc, img_embs, cap_embs, lengths, gate_bn=None):
    """img_embs (n_i, R, d), cap_embs (n_c, L, d), lengths (n_c,) -> scores (n_i, n_c), caption by caption.

    gate_bn(i, logits (n_i, 1, N)) -> normalised logits: SAF's BatchNorm call for caption i; default the
    module's own (one process). baselines/train_step.py passes the K-process SyncBatchNorm's.
    """
    n_image = img_embs.size(0)
    img_glo = _self_attention(sim_enc.v_global_w, img_embs, img_embs.mean(1))
    columns = []
    for i, n_word in enumerate(torch.as_tensor(lengths).tolist()):
        cap = cap_embs[i:i + 1, :n_word]
        cap_rep = cap.repeat(n_image, 1, 1)
        cap_glo = _self_attention(sim_enc.t_global_w, cap, cap.mean(1))
        sim_loc = l2norm(sim_enc.sim_tranloc_w((_scan_attention(cap_rep, img_embs) - cap_rep).pow(2)), dim=-1)
        sim_glo = l2norm(sim_enc.sim_tranglo_w((img_glo - cap_glo).pow(2)), dim=-1)
        nodes = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)  # (n_i, n_word + 1, s)
        if sim_enc.module_name == "SGR":
            for graph in sim_enc.SGR_module:
                edges = torch.softmax(torch.bmm(graph.graph_query_w(nodes),
                                                graph.graph_key_w(nodes).transpose(1, 2)), dim=-1)
                nodes = torch.relu(graph.sim_graph_w(torch.bmm(edges, nodes)))
            vectors = nodes[:, 0]
        else:
            saf = sim_enc.SAF_module
            logits = saf.attn_sim_w(nodes).transpose(1, 2)  # (n_i, 1, N)
            gates = l1norm(torch.sigmoid(saf.bn(logits) if gate_bn is None else gate_bn(i, logits)), dim=-1)
            vectors = l2norm(torch.bmm(gates, nodes).squeeze(1), dim=-1)
        columns.append(torch.sigmoid(sim_enc.sim_eval_w(vectors)))
    return torch.cat(columns, 1)
