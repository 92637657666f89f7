"""Evaluation: R@K (SCAN convention), ASP, from a checkpoint or from saved similarity matrices.

    python evaluation.py --model_path CKPT [--model_path2 CKPT2] [--split testall] [--fold5]
                         [--save_sims S.npy] [--save_ranks F --topk 10] [--json OUT] [--eccv] [--stream]
    python evaluation.py --sims S.npy [--sims S2.npy ...] --data_path D --data_name N --split S
                         [--fold5] [--stream] --json OUT
    python evaluation.py --model_path CKPT [--model_path2 CKPT2] --shortlist EMB_CKPT --shortlist_k K [--fold5]
                         [--shortlist_index exact|hnsw|pca|ivf]

A similarity matrix is (n_images, n_captions) = (n, 5n), rows in image order, columns in caption order;
captions 5i..5i+4 belong to image i. Several matrices (two checkpoints, several --sims) are averaged:
SGRAF = mean of an SGR and an SAF matrix. The metrics' definitions are in metrics.py, how a model's scores
are computed in scoring.py; this file is the command line.

ASP's relevance M is daa_loss.SemanticRelevance on the split's captions (the dev split is cut to its
first 5000 captions, as data.py does); in a fold, ASP uses the fold's block of S and of M (M fit on the
whole split).

--fold5: COCO 1K, the mean over 5 folds of images f n/5 .. (f+1) n/5 - 1 and their captions.

--stream: the same report computed chunk of query rows by chunk (image rows over every caption for i2t,
caption rows over every image for t2i, each direction from its own chunks, the relevance rows per chunk
from the sparse TF-IDF), never the whole matrix: memory is bounded by chunk x gallery. Each chunk is
scored in plain evaluation's shards, so R@K, medr and meanr are equal and ASP equal up to the order of
float additions. A model's pairs are scored once per direction (twice in all) unless --save_sims writes
the matrix to disk, chunk by chunk into a .npy memory map, which the rest then reads. When the matrix
would exceed --max_matrix_gb, evaluation streams by itself and says so.

--shortlist: two-stage retrieval. Per query, the K best gallery items by the shortlist model (ties by
lower index) are scored by the main model(s) and ranked above all others, in the main model's order;
the others follow in the shortlist model's order (in a fold: the fold's gallery). Only those pairs are
scored, each item's own work (encodings, SGR/SAF's global vectors) done once; R@K and ASP are those of the
two rankings (i2t and t2i differ), K >= the gallery = plain scoring. --shortlist_index hnsw|pca|ivf finds the
K candidates with a faiss index of the shortlist model's embeddings instead (ann_index.py), and reports
its recall of the exact top K.
"""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import ann_index
import checkpoint
import data
import distributed
import errors
import fileio
import opts
import vocab as vocab_lib
from daa_loss import SemanticRelevance
from errors import InputError
from layout import CAPTIONS_PER_IMAGE, dataset_dir, fold_bounds
# Names other modules and tests have always used as evaluation.X are re-exported (noqa: F401).
from metrics import (KS, asp, fold_blocks, format_table, i2t, i2t_ranks, mean_of_folds, recall_summary,  # noqa: F401
                     score_folds, score_matrix, t2i, t2i_ranks)
from model import SimilarityModel
from pmrp_com.eccv import eccv_metrics, eccv_scores
from pmrp_com.pmrp import topk_rankings, topk_rows  # noqa: F401
from scoring import (PCME_SCORING, PCMEPP_SCORING, PRECISIONS, SCORING, ModelScores, SavedScores,  # noqa: F401
                     compute_sims, encode, precision, release_freed_memory, resolve_device, score_pairs, score_streamed, shortlist_masks,
                     similarity_block, similarity_pairs, two_stage_values, validate, write_streamed)


def build_parser():
    p = errors.ArgumentParser(
        description="R@K and ASP of a checkpoint (or two: SGRAF) or of saved similarity matrices.")
    p.add_argument("--model_path", action="append", default=[], help="checkpoint to evaluate")
    p.add_argument("--model_path2", default=None,
                   help="second checkpoint of another module (SGR + SAF: SGRAF); the two matrices are averaged")
    p.add_argument("--sims", action="append", default=[],
                   help="saved (n_images, n_captions) .npy to score instead of a model; repeat to average")
    p.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's; required with --sims)")
    p.add_argument("--data_name", default=None,
                   help="with --sims: f30k_precomp, coco_precomp, ...; with a checkpoint it is the checkpoint's "
                        "(another name is refused)")
    p.add_argument("--vocab_path", default=None,
                   help="folder with {data_name}_vocab.json "
                        "(default: the checkpoint's vocabulary, else its vocab_path)")
    p.add_argument("--split", default="test", help="test, testall (COCO 5K) or dev")
    p.add_argument("--fold5", action="store_true", help="COCO 1K: mean over 5 folds of 1/5 of the images")
    p.add_argument("--save_sims", default=None, help="save the whole (n_images, n_captions) matrix as .npy")
    p.add_argument("--save_ranks", default=None,
                   help="JSON lines file: each query's top-k indices and scores, both directions")
    p.add_argument("--topk", type=int, default=10, help="length of the lists --save_ranks writes")
    p.add_argument("--json", default=None, help="write the metrics (and provenance) to this JSON file")
    p.add_argument("--eccv", action="store_true",
                   help="COCO testall: also ECCV Caption mAP@R / R-P / R@1 and CxC R@K (eccv_caption package)")
    p.add_argument("--ann_root", default=os.path.join("pmrp_com", "coco_ann"),
                   help="with --eccv: folder that may hold captions_val2014.json (caption ids by text)")
    p.add_argument("--batch_size", type=int, default=128, help="encoding batch size")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--shard_size", type=int, default=1000, help="images (and captions) per similarity shard")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default, one per core; K CPU processes get cores/K "
                        "each); 1 on a machine shared with other jobs. Scores can differ in the last bits "
                        "with the thread count")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; tf32 (CUDA matmuls); bf16 (autocast): encoders and similarity path only, "
                        "scores and ranking stay fp32")
    p.add_argument("--shortlist", default=None,
                   help="two-stage retrieval: this checkpoint picks each query's --shortlist_k candidates, which "
                        "--model_path (and --model_path2) score and rank above all others")
    p.add_argument("--shortlist_k", type=int, default=None, help="candidates per query with --shortlist")
    p.add_argument("--shortlist_index", default="exact", choices=ann_index.KINDS,
                   help="how --shortlist finds each query's K candidates: exact (the shortlist model's whole rows), "
                        "or a faiss index of its embeddings (hnsw, pca, ivf; VSE, PCME and PCMEpp shortlist "
                        "models), whose recall of the exact top K the report gives")
    p.add_argument("--world_size", type=int, default=1,
                   help="score the matrix with K processes (one per GPU, or K CPU processes), gathered on rank 0")
    p.add_argument("--stream", action="store_true",
                   help="the same report computed chunk of query rows by chunk, never holding the (n_images, "
                        "n_captions) matrix: memory bounded by chunk x gallery (a model's pairs are scored once "
                        "per direction unless --save_sims writes them to disk first)")
    p.add_argument("--max_matrix_gb", type=float, default=None,
                   help="largest score matrix (GB) evaluated in memory; a larger one is streamed as with --stream "
                        "(default: the memory available at start divided by the matrices the in-memory path "
                        "holds: one per model or --sims file, their mean, the relevance)")
    return p


def stream_conflicts(args):
    """The options given that --stream cannot honour, each with why (empty: it can stream)."""
    conflicts = []
    if args.save_ranks:
        conflicts.append("--save_ranks (it ranks the whole matrix in memory)")
    if args.eccv:
        conflicts.append("--eccv (the eccv_caption package takes the whole matrix)")
    if args.shortlist:
        conflicts.append("--shortlist (it ranks from the shortlist model's whole matrix)")
    if args.world_size > 1 or distributed.launched_by_torchrun():
        conflicts.append("--world_size / torchrun (they split a whole matrix between processes)")
    return conflicts


def available_gb():
    """MemAvailable of /proc/meminfo in GB (2^30 bytes); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 2 ** 20 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def decide_streaming(args, model_paths, data_path, data_name):
    """--max_matrix_gb: stream (set args.stream, and say so) when the matrix the in-memory path would hold
    is larger, unless an option needs it whole (then say that it stays in memory)."""
    if args.stream:
        return
    n_captions = len(data.used_captions(data.read_captions(data_path, data_name, args.split), args.split))
    n_images = n_captions // CAPTIONS_PER_IMAGE
    whole = not args.fold5 or bool(args.save_sims or args.save_ranks or args.eccv)
    pairs = n_images * n_captions if whole else sum((hi - lo) * 5 * (hi - lo) for lo, hi in fold_bounds(n_images))
    matrix_gb = 4 * pairs / 2 ** 30
    limit = args.max_matrix_gb
    if limit is None:
        held = max(len(model_paths), len(args.sims)) + (max(len(model_paths), len(args.sims)) > 1) + 1
        available = available_gb()
        if available is None:
            return
        limit = available / held
    if matrix_gb <= limit:
        return
    conflicts = stream_conflicts(args)
    if conflicts:
        print(f"the score matrix ({matrix_gb:.2f} GB) is over --max_matrix_gb {limit:.2f}, but {conflicts[0]}: "
              f"evaluating in memory")
        return
    print(f"streaming: the ({n_images}, {n_captions}) score matrix would take {matrix_gb:.2f} GB, over "
          f"--max_matrix_gb {limit:.2f}; the metrics are computed chunk of query rows by chunk (as --stream)")
    args.stream = True


def relevance_of_split(data_path, data_name, split):
    """SemanticRelevance of a split's captions (dev cut as data.py does) and the captions file's path."""
    captions = data.used_captions(data.read_captions(data_path, data_name, split), split)
    path = os.path.join(data_path, data_name, f"{split}_caps.txt")
    return SemanticRelevance(captions, CAPTIONS_PER_IMAGE, path), path


def load_vocab(args, ckpt, opt, path):
    """Vocabulary: --vocab_path, else the checkpoint's word2idx, else the checkpoint's vocab_path.

    A vocabulary file must be the one checkpoint `path` was trained with (checkpoint.check_vocab).
    """
    if args.vocab_path is None and isinstance(ckpt.get("vocab"), dict):
        return vocab_lib.vocab_from_word2idx(ckpt["vocab"], "the checkpoint's vocabulary")
    vocab_path = os.path.join(args.vocab_path or opt.vocab_path, f"{opt.data_name}_vocab.json")
    vocab = vocab_lib.deserialize_vocab(vocab_path)
    checkpoint.check_vocab(ckpt, path, vocab, vocab_path)
    return vocab


def load_for_scoring(args, path):
    """A checkpoint's model (eval mode), its opt, data_path, the split's image and caption loaders, the
    PrecompDataset and the device to score on; the vocabulary and features are checked against it."""
    ckpt = checkpoint.load_checkpoint(path)
    opt = ckpt["opt"]
    data_path = args.data_path or opt.data_path
    vocab = load_vocab(args, ckpt, opt, path)
    model = SimilarityModel.from_checkpoint(ckpt, path, len(vocab))
    device = distributed.process_device(resolve_device(args.device).type, distributed.rank_and_world()[0])
    image_loader, caption_loader, dataset = data.get_eval_loaders(
        data_path, opt.data_name, args.split, vocab, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    data.check_features(dataset.features, opt.img_dim, f"the model of {path}")
    if distributed.rank_and_world()[0] == 0:
        print(f"{path}: {opt.module_name}, epoch {ckpt.get('epoch')}, {args.split}: "
              f"{dataset.n_images} images, {dataset.n_captions} captions")
    return model, opt, data_path, image_loader, caption_loader, dataset, device


def model_sims(args, path, whole):
    """Similarities of one checkpoint on the split: the full matrix (whole), else the 5 fold blocks.

    Returns (matrix or list of 5 blocks, the checkpoint's opt, data_path, the PrecompDataset).
    """
    model, opt, data_path, image_loader, caption_loader, dataset, device = load_for_scoring(args, path)
    blocks = None if whole else fold_ranges(dataset.n_images)
    sims = compute_sims(model, image_loader, caption_loader, args.shard_size, device, blocks, args.precision)
    return sims, opt, data_path, dataset


def fold_ranges(n_images):
    """((first image, end), (first caption, end)) of each of the 5 folds."""
    return [((lo, hi), (5 * lo, 5 * hi)) for lo, hi in fold_bounds(n_images)]


def two_stage(args, model_paths):
    """--shortlist: the shortlist model's matrix (or fold blocks), each query's --shortlist_k candidates
    (its top K in it, or an ANN index's, see shortlist_candidates), the main models' scores of those pairs
    (an SGRAF pair averaged as plain evaluation does) and the two rankings as two_stage_values.

    Returns (i2t values, t2i values: one (n_img, n_cap) matrix each, or 5 fold blocks with --fold5; the
    t2i ones are transposed views), the main models' opts, data_path, dataset, the "shortlist" report.
    """
    started = time.perf_counter()
    model, shortlist_opt, _, image_loader, caption_loader, dataset, device = load_for_scoring(args, args.shortlist)
    ranges = fold_ranges(dataset.n_images) if args.fold5 else [((0, dataset.n_images), (0, dataset.n_captions))]
    shortlist, img_embs, captions = compute_sims(model, image_loader, caption_loader, args.shard_size, device,
                                                 ranges, args.precision, keep_encoded=True)
    masks, index_report = shortlist_candidates(args, shortlist_opt.module_name, shortlist, ranges, img_embs, captions)
    del model, img_embs, captions
    shortlist_seconds = time.perf_counter() - started
    needed = [i2t_mask | t2i_mask for i2t_mask, t2i_mask in masks]
    started = time.perf_counter()
    results, opts_used = [], []
    for path in model_paths:
        model, opt, data_path, image_loader, caption_loader, dataset, device = load_for_scoring(args, path)
        results.append(score_pairs(model, image_loader, caption_loader, ranges, needed, args.shard_size, device,
                                   args.precision))
        opts_used.append(opt)
    scores = [sum(blocks) / len(blocks) for blocks in zip(*results)]
    del results  # each model's scores: only their mean is ranked
    report = {"checkpoint": args.shortlist, "module_name": shortlist_opt.module_name, "k": args.shortlist_k,
              "pairs_scored": int(sum(m.sum() for m in needed)),
              "pairs_total": int(sum((i1 - i0) * (c1 - c0) for (i0, i1), (c0, c1) in ranges)),
              "shortlist_seconds": shortlist_seconds, "scoring_seconds": time.perf_counter() - started}
    if index_report:
        report["index"] = index_report
    print(f"shortlist {args.shortlist} ({shortlist_opt.module_name}): top {args.shortlist_k} per query, "
          f"{report['pairs_scored']:,} of {report['pairs_total']:,} pairs scored by each of {len(model_paths)} "
          f"model(s); shortlist {shortlist_seconds:.1f} s, scoring {report['scoring_seconds']:.1f} s")
    i2t_values = [two_stage_values(block, s, i2t_mask) for block, s, (i2t_mask, _) in zip(shortlist, scores, masks)]
    t2i_values = [two_stage_values(block.T, s.T, t2i_mask.T).T
                  for block, s, (_, t2i_mask) in zip(shortlist, scores, masks)]
    return i2t_values, t2i_values, opts_used, data_path, dataset, report


def shortlist_candidates(args, module_name, shortlist, ranges, img_embs, captions):
    """Each block's (i2t, t2i) candidate masks (scoring.shortlist_masks) and, for --shortlist_index hnsw|pca|ivf,
    the "index" report: its recall of the exact top K (ties by lower index) per direction, the seconds of
    building its indexes and of searching them, and of the exact top K from the matrix (None for exact).

    shortlist: the shortlist model's blocks of `ranges`; img_embs, captions: its encodings (one row per
    item: ann_index.search_vectors)."""
    k, kind = args.shortlist_k, args.shortlist_index
    if kind == "exact":
        return [shortlist_masks(block, k) for block in shortlist], None
    started = time.perf_counter()
    exact = [(topk_rows(block, k), topk_rows(block.T, k)) for block in shortlist]
    exact_seconds = time.perf_counter() - started
    (img_queries, cap_gallery), (cap_queries, img_gallery) = ann_index.search_vectors(
        module_name, img_embs.numpy(), captions[0][1].numpy())
    masks, hits, seconds, threads = [], {"i2t": [], "t2i": []}, np.zeros(2), torch.get_num_threads()
    unprojected = ann_index.unprojected_coordinates(module_name)
    for block, ((i0, i1), (c0, c1)), (i2t_exact, t2i_exact) in zip(shortlist, ranges, exact):
        i2t_ids, *i2t_s = ann_index.top_k(kind, img_queries[i0:i1], cap_gallery[c0:c1], k, threads, unprojected)
        t2i_ids, *t2i_s = ann_index.top_k(kind, cap_queries[c0:c1], img_gallery[i0:i1], k, threads, unprojected)
        seconds += np.add(i2t_s, t2i_s)  # (building, searching)
        masks.append(shortlist_masks(block, k, (i2t_ids, t2i_ids)))
        hits["i2t"].append((ann_index.recall(i2t_ids, i2t_exact), i2t_exact.size))
        hits["t2i"].append((ann_index.recall(t2i_ids, t2i_exact), t2i_exact.size))
    recall = {d: sum(r * n for r, n in v) / sum(n for _, n in v) for d, v in hits.items()}
    print(f"--shortlist_index {kind}: recall of the exact top {k} i2t {recall['i2t']:.4f}, t2i {recall['t2i']:.4f}; "
          f"index built in {seconds[0]:.2f} s, searched in {seconds[1]:.2f} s; exact top {k} from the matrix "
          f"{exact_seconds:.2f} s")
    return masks, {"kind": kind, "i2t_recall": recall["i2t"], "t2i_recall": recall["t2i"],
                   "build_seconds": float(seconds[0]), "search_seconds": float(seconds[1]), "exact_seconds": exact_seconds}


def save_ranks(sims, k, path):
    """JSON lines, i2t queries first then t2i: {"direction", "query", "topk": [indices], "scores": [...]}.

    i2t: query = image row, indices = caption columns; t2i: query = caption column, indices = image
    rows; descending score, ties by lower index.
    """
    i2t_idx, i2t_sc, t2i_idx, t2i_sc = topk_rankings(sims, k)
    with fileio.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for direction, idx, sc in (("i2t", i2t_idx, i2t_sc), ("t2i", t2i_idx, t2i_sc)):
            for q in range(len(idx)):
                f.write(json.dumps({"direction": direction, "query": q, "topk": idx[q].tolist(),
                                    "scores": [float(s) for s in sc[q]]}) + "\n")


def check_before_scoring(args, model_paths):
    """What can be checked from the checkpoints' options and the caption files, before a matrix is scored
    (hours for COCO 5K): the dataset folder (with a suggestion for a near-miss name), an ensemble pair (two
    models of different modules, e.g. SGR + SAF = SGRAF, of one dataset), and the split --eccv needs.
    Returns the data path and name."""
    if model_paths:
        options = [checkpoint.load_checkpoint(path)["opt"] for path in model_paths]
        data_path, data_name = args.data_path or options[0].data_path, options[0].data_name
        if args.data_name not in (None, data_name):  # never silently score another dataset than the one asked for
            raise InputError(f"--data_name {args.data_name}: {model_paths[0]} was trained on {data_name}, whose "
                             f"split a checkpoint is scored on (--data_path may point at another copy of it)")
        if len(options) == 2 and options[1].data_name != data_name:
            raise InputError(f"{model_paths[1]}: trained on {options[1].data_name}, but {model_paths[0]} on "
                             f"{data_name}; an ensemble pair scores one dataset")
        if len(options) == 2 and options[1].module_name == options[0].module_name:
            raise InputError(f"{model_paths[1]}: {opts.with_article(options[1].module_name)} model like "
                             f"{model_paths[0]}; an ensemble pair averages two modules, e.g. SGR + SAF (average two "
                             f"runs of one module with --sims)")
    else:
        data_path, data_name = args.data_path, args.data_name
    dataset_dir(data_path, data_name)
    if args.eccv:
        eccv_metrics(len(data.read_captions(data_path, data_name, args.split)), data_name, args.split)
    return data_path, data_name


def check_shortlist(args, model_paths):
    """--shortlist: its checkpoint must rank the main model's dataset, with the same features and
    vocabulary (checked before anything is scored)."""
    shortlist_ckpt, main_ckpt = checkpoint.load_checkpoint(args.shortlist), checkpoint.load_checkpoint(model_paths[0])
    shortlist_opt, main_opt = shortlist_ckpt["opt"], main_ckpt["opt"]
    if shortlist_opt.data_name != main_opt.data_name:
        raise InputError(f"{args.shortlist}: a shortlist model of {shortlist_opt.data_name}, but {model_paths[0]} "
                         f"was trained on {main_opt.data_name}; both must rank one dataset")
    if shortlist_opt.img_dim != main_opt.img_dim:
        raise InputError(f"{args.shortlist}: a shortlist model of {shortlist_opt.img_dim}-dim features, but "
                         f"{model_paths[0]} reads {main_opt.img_dim}-dim ones; both must rank one dataset")
    shortlist_vocab = load_vocab(args, shortlist_ckpt, shortlist_opt, args.shortlist)
    main_vocab = load_vocab(args, main_ckpt, main_opt, model_paths[0])
    if shortlist_vocab.word2idx != main_vocab.word2idx:
        raise InputError(f"{args.shortlist}: its vocabulary ({len(shortlist_vocab)} words) is not the one of "
                         f"{model_paths[0]} ({len(main_vocab)} words); a shortlist model must be trained on the "
                         f"same dataset and vocabulary")


def main(argv=None):
    args = build_parser().parse_args(argv)
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    if bool(model_paths) == bool(args.sims):
        raise InputError("give either --model_path (and optionally --model_path2) or --sims, not both or neither")
    if args.sims and not (args.data_path and args.data_name):
        raise InputError("--sims needs --data_path and --data_name (the split's captions give ASP)")
    if args.eccv and (args.fold5 or args.split != "testall"):
        raise InputError("--eccv scores the whole COCO testall split: use --split testall without --fold5")
    if args.topk < 1 or args.shard_size < 1 or args.world_size < 1 or args.threads < 0:
        raise InputError("--topk, --shard_size and --world_size must be positive, --threads not negative")
    if args.sims and args.world_size > 1:
        raise InputError("--world_size splits the scoring of a model; --sims matrices are already scored")
    if (args.shortlist is None) != (args.shortlist_k is None):
        raise InputError("--shortlist CKPT and --shortlist_k K go together (two-stage retrieval)")
    if args.shortlist is not None:
        if args.shortlist_k < 1:
            raise InputError(f"--shortlist_k must be at least 1 (candidates per query), got {args.shortlist_k}")
        if args.sims:
            raise InputError("--shortlist re-scores a model's candidates with --model_path; --sims matrices have "
                             "no model to re-score them")
        if args.save_sims or args.save_ranks or args.eccv:
            raise InputError("--save_sims, --save_ranks and --eccv need one similarity matrix; --shortlist ranks "
                             "the two directions from different candidates and scores only those")
        if args.world_size > 1 or distributed.launched_by_torchrun():
            raise InputError("--shortlist runs in one process (--world_size and torchrun split a full matrix)")
        if args.shortlist_index != "exact":
            module_name = checkpoint.load_checkpoint(args.shortlist)["opt"].module_name
            if module_name not in ann_index.INDEXED_MODULES:
                raise InputError(f"{args.shortlist}: --shortlist_index {args.shortlist_index} searches one embedding "
                                 f"per item ({', '.join(ann_index.INDEXED_MODULES)}); "
                                 f"{opts.with_article(module_name)} model scores every pair "
                                 f"with a network (use --shortlist_index exact)")
    elif args.shortlist_index != "exact":
        raise InputError("--shortlist_index picks the candidates of --shortlist: give --shortlist CKPT --shortlist_k K")
    if args.max_matrix_gb is not None and not args.max_matrix_gb > 0:
        raise InputError(f"--max_matrix_gb must be positive, got {args.max_matrix_gb}")
    if args.stream and stream_conflicts(args):
        raise InputError(f"--stream computes the metrics chunk by chunk and cannot give {stream_conflicts(args)[0]}")
    for output in (args.json, args.save_sims, args.save_ranks):
        if output:
            fileio.check_output(output)
    data_path, data_name = check_before_scoring(args, model_paths)
    if args.shortlist:
        check_shortlist(args, model_paths)
    decide_streaming(args, model_paths, data_path, data_name)
    threads = torch.get_num_threads()  # --threads is this evaluation's: an in-process caller keeps its own
    try:
        if distributed.launched_by_torchrun():
            rank = int(os.environ["RANK"])
            distributed.init_group(rank, int(os.environ["WORLD_SIZE"]), "env://", resolve_device(args.device).type,
                                   threads=args.threads)
            try:
                with distributed.lost_peer_exits(rank, "evaluation"):
                    return evaluate(args, argv)
            finally:
                dist.destroy_process_group()
        if args.world_size > 1:
            return distributed.run_spawned(args.world_size, resolve_device(args.device).type, args.threads,
                                           "evaluation", evaluate, args, argv)
        distributed.set_threads(args.threads)
        return evaluate(args, argv)
    finally:
        torch.set_num_threads(threads)


def evaluate(args, argv):
    """Everything main does once the processes are set up; ranks other than 0 return None."""
    model_paths = args.model_path + ([args.model_path2] if args.model_path2 else [])
    relevance, t2i_sims, t2i_blocks, shortlist, sims = None, None, None, None, None
    if args.stream:
        folds, whole, opts_used, data_path, data_name, relevance = evaluate_streamed(args, model_paths)
    else:
        if args.shortlist:
            i2t_values, t2i_values, opts_used, data_path, dataset, shortlist = two_stage(args, model_paths)
            data_name, relevance = opts_used[0].data_name, dataset.relevance
            if args.fold5:
                sims, blocks, t2i_blocks = None, i2t_values, t2i_values
            else:
                (sims,), (t2i_sims,), blocks = i2t_values, t2i_values, None
        elif args.sims:
            relevance, caps_path = relevance_of_split(args.data_path, args.data_name, args.split)
            sims = fileio.load_sims(args.sims, relevance.n_captions, caps_path)
            data_path, data_name, opts_used, blocks = args.data_path, args.data_name, None, None
        else:
            # --fold5 alone scores only the five diagonal blocks; the rest of the matrix is never needed.
            whole = not args.fold5 or bool(args.save_sims or args.save_ranks or args.eccv)
            results, opts_used = [], []
            for path in model_paths:
                out, opt, data_path, dataset = model_sims(args, path, whole)
                results.append(out)
                opts_used.append(opt)
            if distributed.rank_and_world()[0] != 0:
                return None
            data_name = opts_used[0].data_name
            relevance = dataset.relevance
            if whole:
                sims = results[0] if len(results) == 1 else sum(results) / len(results)
                blocks = None
            else:
                sims = None
                blocks = [sum(b) / len(b) for b in zip(*results)]
        if args.save_sims:
            fileio.save_npy(sims, args.save_sims)
            print(f"saved the {sims.shape} similarity matrix to {args.save_sims}")
        if args.save_ranks:
            save_ranks(sims, args.topk, args.save_ranks)
        folds = whole = None
        if args.fold5:
            sems_blocks = [relevance.block(np.arange(lo, hi), np.arange(5 * lo, 5 * hi))
                           for lo, hi in fold_bounds(relevance.n_images)]
            folds = score_folds(fold_blocks(sims) if blocks is None else blocks, sems_blocks, t2i_blocks)
        if sims is not None:
            whole = score_matrix(sims, relevance.matrix(), t2i_sims)

    n_images = relevance.n_images
    report = {"split": args.split, "fold5": bool(args.fold5), "n_images": n_images,
              "n_captions": relevance.n_captions}
    scoring = dict.fromkeys(SCORING[o.module_name] for o in opts_used or () if o.module_name in SCORING)
    if scoring:
        report["pcme_scoring"] = "; ".join(scoring)
    if args.fold5:
        report.update(folds)
        for f, s in enumerate(report["folds"]):
            print(format_table(s, f"{data_name} {args.split} fold {f}"))
        print(format_table(report, f"{data_name} {args.split}: mean of 5 folds (1K)"))
        if whole is not None:
            report["all"] = whole
            print(format_table(report["all"], f"{data_name} {args.split}: all {n_images} images"))
    else:
        report.update(whole)
        print(format_table(report, f"{data_name} {args.split}: {n_images} images"))
    if shortlist:
        report["shortlist"] = shortlist
    if args.eccv:
        report["eccv"] = eccv_scores(sims, data_path, data_name, args.split, args.ann_root)
        print(json.dumps(report["eccv"], indent=2))
    if args.json:
        report["provenance"] = fileio.provenance(
            argv, checkpoint=model_paths or None, sims=args.sims or args.save_sims,
            opt=[vars(o) for o in opts_used] if opts_used else None, data_path=data_path, data_name=data_name)
        fileio.write_json(report, args.json)
    return report


def evaluate_streamed(args, model_paths):
    """--stream: the fold scores (metrics.mean_of_folds' dict, with --fold5) and the whole split's
    (score_matrix's dict; with --fold5 only for --sims or --save_sims, where in memory the matrix is whole), computed
    chunk of query rows by chunk (scoring.score_streamed), and opts_used, data_path, data_name, relevance.

    Each model is encoded once and its chunks scored as they are needed; with --save_sims every score is
    first written to the .npy (a memory map, chunk by chunk, renamed into place when complete) and the
    metrics then read the saved file, so no pair is scored twice.
    """
    if args.sims:
        relevance, caps_path = relevance_of_split(args.data_path, args.data_name, args.split)
        scores = SavedScores(args.sims, relevance.n_captions, caps_path)
        data_path, data_name, opts_used = args.data_path, args.data_name, None
    else:
        encoded, opts_used = [], []
        for path in model_paths:
            model, opt, data_path, image_loader, caption_loader, dataset, device = load_for_scoring(args, path)
            model.to(device).eval()
            with precision(args.precision, device):
                img_embs, captions = encode(model, image_loader, caption_loader, device)
            release_freed_memory()
            encoded.append((model, img_embs, captions, device))
            opts_used.append(opt)
        scores = ModelScores(encoded, args.shard_size, args.precision)
        data_name, relevance = opts_used[0].data_name, dataset.relevance
    n_images, n_captions = scores.shape
    whole_range = ((0, n_images), (0, n_captions))
    if args.save_sims:
        with fileio.open_npy_for_writing(args.save_sims, scores.shape, scores.dtype) as out:
            write_streamed(scores, out)
        print(f"saved the {scores.shape} similarity matrix to {args.save_sims}")
        scores = SavedScores([args.save_sims])
    folds = whole = None
    if args.fold5:
        folds = mean_of_folds([score_streamed(scores, relevance, *block) for block in fold_ranges(n_images)])
    if not args.fold5 or args.save_sims or args.sims:  # in memory a whole matrix is scored "all" with the folds
        whole = score_streamed(scores, relevance, *whole_range)
    return folds, whole, opts_used, data_path, data_name, relevance


if __name__ == "__main__":
    sys.exit(errors.run(main))
