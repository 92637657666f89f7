"""tools.bench's scoring and training cases: similarity (SGR / SAF scores of every pair), train (one training
step) and daa (the DAA loss alone), each against its baseline in tools/baselines/."""
import copy
import time

import numpy as np
import torch

import evaluation
from daa_loss import DAALoss, SemanticRelevance, contrastive_loss
from tools.baselines.daa_direct import daa_loss_direct
from tools.baselines.sim_loop import sim_one_caption_at_a_time
from tools.bench_common import (_torch_mem, build_model, max_abs_diff, measure, random_inputs, row, similarity_flops,
                                synthetic_captions, train_step_flops)


def bench_similarity(sizes, device, compile_chunks):
    """Eval-mode scores of n_images x n_captions pairs, SGR and SAF, pairs per second."""
    n_i, n_c, shard = sizes["sim_images"], sizes["sim_captions"], sizes["shard"]
    images, captions, lengths = random_inputs(n_i, n_c, sizes, device)
    rows = []
    for module_name in ("SGR", "SAF"):
        model = build_model(sizes, module_name, device).eval()
        with torch.no_grad():
            img_embs, cap_embs = model.encode_images(images), model.encode_captions(captions, lengths)

            def baseline():  # the original's evaluation: 100 x 100 shards, one caption at a time in each
                out = torch.empty(n_i, n_c, device=device)
                for a in range(0, n_i, shard):
                    for c in range(0, n_c, shard):
                        out[a:a + shard, c:c + shard] = sim_one_caption_at_a_time(
                            model.sim_enc, img_embs[a:a + shard], cap_embs[c:c + shard], lengths[c:c + shard])
                return out

            def project(m=model):
                return evaluation.similarity_block(m, img_embs.cpu(), [(0, cap_embs.cpu(), lengths)], (0, n_i),
                                                   (0, n_c), 1000, device)

            sim_one_caption_at_a_time(model.sim_enc, img_embs[:4], cap_embs[:4], lengths[:4])  # warm-up
            model.similarity(img_embs[:4], cap_embs[:4], lengths[:4])
            base = measure(baseline, device)
            proj = measure(project, device)
            size = f"{n_i} images x {n_c} captions, dims {'/'.join(map(str, sizes['dims']))}"
            flops = similarity_flops(n_i, lengths, sizes["dims"], module_name)
            rows.append(row(f"similarity {module_name}", size, base[:2], proj[:2],
                            max_abs_diff([(proj[2], base[2])]), pairs=n_i * n_c, mem=_torch_mem(device), flops=flops))
            if compile_chunks:
                compiled = copy.deepcopy(model)
                compiled.sim_enc._nodes = torch.compile(compiled.sim_enc._nodes, dynamic=True)
                start = time.perf_counter()
                project(compiled)  # compiles, for every chunk shape this input needs
                compile_s = time.perf_counter() - start
                comp = measure(lambda: project(compiled), device)
                rows.append(row(f"similarity {module_name}, torch.compile", size, base[:2], comp[:2],
                                max_abs_diff([(comp[2], base[2])]), pairs=n_i * n_c, mem=_torch_mem(device),
                                flops=flops, note=f"first call (compiling) {compile_s:.0f} s"))
    return rows


def train_step(model, optimizer, images, captions, lengths, relevance, scores_and_loss):
    """Forward, loss, backward, clip (2.0, as train.py), Adam step: returns the scores, the loss and a copy
    of the gradients (for the comparison; the new weights would not do: Adam's first step moves every
    weight by about lr whatever the size of its gradient, so rounding noise on a ~0 gradient shows)."""
    sims, loss = scores_and_loss(model, images, captions, lengths, relevance)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sims.detach(), loss.detach(), grads


def project_loss(model, images, captions, lengths, relevance):
    """The project's forward: all pairs at once; VSE++ + blockwise DAA (what train.py computes)."""
    sims = model(images, captions, lengths)
    return sims, DAALoss(daa_weight=25)(sims, relevance)["loss"]


def baseline_loss(model, images, captions, lengths, relevance):
    """The original's forward: encoders, then the similarity one caption at a time; VSE++ + direct DAA."""
    sims = sim_one_caption_at_a_time(model.sim_enc, model.encode_images(images),
                                     model.encode_captions(captions, lengths), lengths)
    return sims, contrastive_loss(sims) + daa_loss_direct(sims, relevance, 25.0, variant="reference")


def bench_train(sizes, device):
    """One step at the training batch size, SGR and SAF, from identical weights and a fresh Adam."""
    n = sizes["batch"]
    images, captions, lengths = random_inputs(n, n, sizes, device, seed=1)
    relevance = torch.from_numpy(SemanticRelevance(synthetic_captions(5 * n, seed=1)).block(
        np.arange(n), 5 * np.arange(n))).to(device)  # each image's first caption, as a batch
    warm = random_inputs(4, 4, sizes, device, seed=2) + (relevance[:4, :4],)
    rows = []
    for module_name in ("SGR", "SAF"):
        results = {}
        for side, loss_fn in (("baseline", baseline_loss), ("project", project_loss)):
            scratch = build_model(sizes, module_name, device).train()  # warm-up on a throw-away copy
            train_step(scratch, torch.optim.Adam(scratch.parameters(), lr=2e-4), *warm, loss_fn)
            del scratch
            model = build_model(sizes, module_name, device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
            results[side] = measure(lambda: train_step(model, optimizer, images, captions, lengths, relevance,
                                                       loss_fn), device, once=True)
        (sims_p, loss_p, grads_p), (sims_b, loss_b, grads_b) = results["project"][2], results["baseline"][2]
        grad_diff = max_abs_diff(zip(grads_p, grads_b)) / max(float(g.abs().max()) for g in grads_b)
        loss_diff = abs(float(loss_p) - float(loss_b)) / abs(float(loss_b))
        rows.append(row(f"training step {module_name}", f"batch {n}, dims {'/'.join(map(str, sizes['dims']))}",
                        results["baseline"][:2], results["project"][:2], max_abs_diff([(sims_p, sims_b)]),
                        mem=_torch_mem(device), flops=train_step_flops(n, lengths, sizes["dims"], module_name),
                        note=f"forward + VSE++ + DAA + backward + clip + Adam, one step; diff over the scores; the "
                             f"loss ({float(loss_b):.1f}) within {loss_diff:.0e} relative, the largest gradient "
                             f"difference {grad_diff:.0e} of the largest gradient"))
    return rows


def bench_daa(sizes, device):
    """DAA loss (both directions) forward + backward at each N."""
    rows = []
    warm = torch.rand(8, 8, device=device, requires_grad=True)
    daa_loss_direct(warm, warm.detach(), 25.0, variant="reference").backward()
    DAALoss(daa_weight=25)(warm, warm.detach())["loss"].backward()
    for n in sizes["daa"]:
        gen = torch.Generator().manual_seed(n)
        S, M = torch.rand(n, n, generator=gen).to(device), torch.rand(n, n, generator=gen).to(device)
        criterion = DAALoss(daa_weight=25)

        def run(loss_fn):
            leaf = S.clone().requires_grad_()
            loss = loss_fn(leaf)
            loss.backward()
            return loss.detach(), leaf.grad

        def project(s):
            out = criterion(s, M)
            return out["daa_i2t_loss"] + out["daa_t2i_loss"]

        base = measure(lambda: run(lambda s: daa_loss_direct(s, M, 25.0, variant="reference")), device)
        proj = measure(lambda: run(project), device)
        rows.append(row("DAA loss", f"N = {n}", base[:2], proj[:2],
                        max_abs_diff([(proj[2][0], base[2][0]), (proj[2][1], base[2][1])]), mem=_torch_mem(device),
                        note="forward + backward, both directions; diff over loss and gradient"))
        tie_aware = DAALoss(daa_weight=25, daa_variant="tie_aware")
        ties = measure(lambda: run(lambda s: sum(tie_aware.daa_terms(s, M))), device)
        rows.append(row("DAA tie_aware vs reference", f"N = {n}", proj[:2], ties[:2], mem=_torch_mem(device),
                        note="both blockwise; 'baseline' = the reference variant (another objective: no diff)"))
    return rows
