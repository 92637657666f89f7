"""Train SGR, SAF or VSE with the VSE++ triplet loss + DAA, or PCME with its soft contrastive loss + DAA, or
PCME++ with its closed-form matching loss + DAA, on one process or many (torch.distributed).

    python train.py --data_name f30k_precomp --num_epochs 40 --learning_rate 0.0006 --lr_update 30 \
        --world_size 1 --module_name SGR --daa_weight 10

`--world_size K` spawns K processes itself (nccl on GPUs, gloo on CPU); `torchrun --nproc_per_node K
train.py ...` works as well. Each process computes the loss on its own batch of `batch_size`, DDP
averages the gradients, and the learning rate is multiplied by world_size x accum_steps at run time
(the stored option stays unscaled, so resuming or relaunching never scales it twice).
"""
import argparse
import contextlib
import glob
import logging
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluation
import opts
from checkpoint import add_module_prefix, check_vocab, load_checkpoint, save_checkpoint
from daa_loss import DAALoss
from distributed import (check_world_size, free_port, init_group, launched_by_torchrun, lost_peer_exits, process_device,
                         set_threads)
from errors import InputError, TrainingDiverged, run
from fileio import check_output
from layout import dataset_dir
from model import SimilarityModel
from pcme_loss import PCMELoss, PCMEppLoss
from vocab import deserialize_vocab

log = logging.getLogger("train")

# What a resumed run cannot change: the options its weights' shapes and meaning depend on (the vocabulary
# is checked word by word against the checkpoint's).
FIXED_ON_RESUME = ("module_name", "img_dim", "word_dim", "embed_size", "sim_dim", "num_layers", "bi_gru",
                   "no_imgnorm", "no_txtnorm", "sgr_step", "vse_pool")
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pth\.tar")


# ------------------------------------------------------------------------------------------------
# Set-up


def configure_logging(rank):
    """Log lines with time and rank; INFO from rank 0, warnings only from the others."""
    logging.basicConfig(format=f"%(asctime)s [rank {rank}] %(message)s", level=logging.INFO if rank == 0 else logging.WARNING)


def device_type(opt):
    """'cuda' or 'cpu': --device with auto resolved on this machine (the stored option stays as given)."""
    return evaluation.resolve_device(opt.device).type


def process_count(opt):
    """Processes of the run: torchrun's WORLD_SIZE when it launched us, else --world_size."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else opt.world_size


def check_options(opt):
    """Reject option combinations that cannot work, before any process is started."""
    for name in ("batch_size", "num_epochs", "accum_steps", "world_size", "log_step", "val_step", "lr_update"):
        if getattr(opt, name) < 1:
            raise InputError(f"--{name} must be at least 1 (got {getattr(opt, name)})")
    if opt.val_images < 0 or opt.warmup_epochs < 0 or opt.workers < 0 or opt.threads < 0:
        raise InputError("--val_images, --warmup_epochs, --workers and --threads cannot be negative")
    if opt.pcme_samples < 1 or opt.pcme_vib_weight < 0:
        raise InputError("--pcme_samples must be at least 1 and --pcme_vib_weight cannot be negative")
    if not (opt.pcmepp_vib_weight >= 0 and opt.pcmepp_pseudo_weight >= 0):
        raise InputError("--pcmepp_vib_weight and --pcmepp_pseudo_weight must be numbers of at least 0")
    scale, shift = opt.pcmepp_init_scale, opt.pcmepp_init_shift
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(shift)):
        raise InputError("--pcmepp_init_scale must be a finite number above 0 and --pcmepp_init_shift a finite number")
    check_world_size(opt.world_size, device_type(opt))
    if opt.amp == "fp16" and device_type(opt) != "cuda":
        raise InputError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")


def check_module_options(opt, given):
    """InputError for an option `given` ({name: value}) that the run's module does not read (opts.MODULE_OPTIONS)."""
    for name, module_names in opts.MODULE_OPTIONS.items():
        if name in given and opt.module_name not in module_names:
            raise InputError(f"{opts.option_flags(name)} is {opts.with_article('/'.join(module_names))} option, but "
                             f"this run trains {opts.with_article(opt.module_name)} model")


def build_criterion(opt):
    """The loss of the run's module: PCME's soft contrastive + KL + DAA, PCME++'s matching + pseudo-positive
    matching + KL + DAA, else the VSE++ hinge + DAA."""
    if opt.module_name == "PCME":
        return PCMELoss(opt.pcme_vib_weight, opt.daa_weight, opt.daa_temp, opt.daa_variant)
    if opt.module_name == "PCMEpp":
        return PCMEppLoss(opt.pcmepp_vib_weight, opt.pcmepp_pseudo_weight, opt.daa_weight, opt.daa_temp,
                          opt.daa_variant)
    return DAALoss(opt.margin, opt.max_violation, opt.daa_weight, opt.daa_temp, opt.daa_variant)


def vocab_file(opt):
    return os.path.join(opt.vocab_path, f"{opt.data_name}_vocab.json")


def load_start_checkpoint(opt, path):
    """Load a --resume/--init_from checkpoint and check that it belongs to the requested model."""
    ckpt = load_checkpoint(path)
    if ckpt["opt"].module_name != opt.module_name:
        raise InputError(f"{path}: checkpoint holds {opts.with_article(ckpt['opt'].module_name)} model but "
                         f"--module_name is {opt.module_name}")
    return ckpt


def run_checkpoints(folder):
    """Names of the checkpoints (checkpoint_{epoch}, model_best) in `folder`, sorted; [] if there is none."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n) or n == "model_best.pth.tar")


def resume_path(resume, model_name):
    """The checkpoint --resume names: a file, a run folder's newest checkpoint_{epoch}, or with 'latest'
    the newest of --model_name (the highest epoch: only finished files carry that name)."""
    folder = model_name if resume == "latest" else resume
    if resume == "latest" and not os.path.isdir(folder):
        raise InputError(f"--resume latest: {folder} (--model_name) is not a run folder")
    if not os.path.isdir(folder):
        return resume
    epochs = [int(m.group(1)) for m in map(CHECKPOINT_NAME.fullmatch, os.listdir(folder)) if m]
    if not epochs:
        raise InputError(f"{folder}: no checkpoint_{{epoch}}.pth.tar to resume from (--resume {resume})")
    return os.path.join(folder, f"checkpoint_{max(epochs)}.pth.tar")


def resume_options(opt, given):
    """The options of the run --resume continues: the checkpoint's, with those `given` on the command line
    ({name: value}) on top, each change logged. Checkpoints go on in the resumed file's folder unless
    --model_name says otherwise. Returns (options, the checkpoint's dict)."""
    path = resume_path(opt.resume, opt.model_name)
    ckpt = load_checkpoint(path)
    stored = ckpt["opt"]
    for name in FIXED_ON_RESUME:
        if name in given and given[name] != getattr(stored, name):
            raise InputError(f"--{name}: {path} was trained with {name}={getattr(stored, name)}, not "
                             f"{given[name]}; dims, module and vocabulary cannot change when resuming")
    resumed = argparse.Namespace(**{**vars(stored), **given})
    resumed.resume = path
    resumed.model_name = given.get("model_name", os.path.dirname(path) or ".")
    log.info("resuming %s (finished epochs: %d) with its options", path, ckpt.get("epoch", 0))
    for name, value in sorted(given.items()):
        if name != "resume" and getattr(stored, name) != value:
            log.info("resuming with --%s %s instead of %s", name, value, getattr(stored, name))
    return resumed, ckpt


def check_run_folders(opt):
    """InputError if this run would mix its outputs with another run's.

    A new run needs a --model_name without checkpoints and a --logger_name without TensorBoard files (two
    runs' curves in one folder cannot be told apart). A resumed run may write to the folder of the
    checkpoint it resumes, or to one without checkpoints (a branch of it).
    """
    names = run_checkpoints(opt.model_name)
    if opt.resume:
        same_folder = os.path.realpath(os.path.dirname(opt.resume) or ".") == os.path.realpath(opt.model_name)
        if names and not same_folder:
            raise InputError(f"{opt.model_name}: holds checkpoints of another run than {opt.resume} "
                             f"({', '.join(names[:3])}); give another --model_name")
        return
    if names:
        raise InputError(f"{opt.model_name}: holds checkpoints of another run ({', '.join(names[:3])}); give a new "
                         f"--model_name, or continue that run with --resume {opt.model_name}")
    if glob.glob(os.path.join(opt.logger_name, "events.out.tfevents.*")):
        raise InputError(f"{opt.logger_name}: holds another run's TensorBoard logs; give a new --logger_name "
                         f"(e.g. --logger_name {os.path.join(opt.model_name, 'log')})")


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def distribute(model, device):
    """A process's model for a K-process run (process group initialised), with the original's shared statistics.

    SAF's gate BatchNorm pools caption i's statistics with the i-th caption of every process's batch, forward
    and backward, as the original's SyncBatchNorm called once per caption does, on gloo and nccl alike. On
    GPUs VisualSA's BatchNorms become SyncBatchNorm, as in the original; on CPUs PyTorch's SyncBatchNorm does
    not run and they keep per-process statistics. (SAF's gate reads its BatchNorm's parameters without
    calling it, so the conversion does not pool it a second time.)
    """
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if model.sim_enc.module_name == "SAF":
        model.sim_enc.SAF_module.process_group = dist.group.WORLD
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def use_deterministic_algorithms():
    """--deterministic: torch's deterministic kernels, so that a resumed GPU run repeats a straight one bit for bit.

    Without it a GPU run is repeatable only up to the atomic adds of some backward passes (the word
    embedding's gradient, index and scatter ops), whose order changes from run to run; on a CPU every
    kernel used here is deterministic already and nothing changes. cuBLAS needs a fixed workspace for
    deterministic products; it reads CUBLAS_WORKSPACE_CONFIG when this process first uses it, i.e. after
    this call. An op without a deterministic kernel then stops the run with torch's error naming it.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def set_learning_rate(opt, optimizer, epoch):
    """Base rate x processes x accum_steps, divided by 10 every lr_update epochs (the original's schedule)."""
    lr = opt.learning_rate * process_count(opt) * opt.accum_steps * (0.1 ** (epoch // opt.lr_update))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def micro_batch(model, distributed, last):
    """The context of one micro-batch's forward and backward. DDP all-reduces the gradients in backward; the
    micro-batches before a step's `last` only accumulate them in this process (DDP's no_sync), so that a step
    of accum_steps micro-batches all-reduces once instead of accum_steps times (the sum is the same)."""
    return model.no_sync() if distributed and not last else contextlib.nullcontext()


def compute_losses(model, criterion, images, captions, lengths, relevance, max_violation, amp_dtype=None,
                   image_ids=None):
    """One batch's forward and loss: images (B, 36, D), captions (B, L), lengths (B,), relevance (B, B).

    Returns the criterion's dict of 0-dim tensors (loss, contrastive_loss, daa_i2t_loss, daa_t2i_loss; PCME
    adds vib_loss, PCMEpp vib_loss and pseudo_positive_loss). The model runs under autocast when `amp_dtype` is given; the loss is computed in fp32
    regardless. image_ids (B,), PCMEpp only: each pair of the same image is a match of PCME++'s BCE (two
    captions of one image in a batch; without them only the diagonal).
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, captions, lengths)  # (B, B) scores; PCME, PCMEpp: an embedding_models.PCMEBatch
    if image_ids is not None and isinstance(criterion, PCMEppLoss):
        image_ids = torch.as_tensor(image_ids, device=relevance.device)
        return criterion(outputs, relevance, max_violation=max_violation,
                         matches=image_ids[:, None] == image_ids[None, :])
    return criterion(outputs, relevance, max_violation=max_violation)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Clip the accumulated gradients (norm `grad_clip`, 0 = off), take the Adam step, clear the gradients.

    Returns the gradient norm before clipping (None when clipping is off), as clip_grad_norm_ reports it.
    """
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ------------------------------------------------------------------------------------------------
# Validation and checkpoints


def validate(opt, model, val_loaders, device, writer, step):
    """R@K and ASP on the dev split; rank 0 logs the original's TensorBoard scalars and gets the rsum.

    Every rank takes part: each scores its share of the (images x captions) matrix and rank 0 gathers
    it (evaluation.compute_sims), so K processes validate K times faster instead of K times over.
    Other ranks get None. Every rank scores with rank 0's BatchNorm statistics, the ones the checkpoint
    holds, so that validation finds what one process's evaluation of the checkpoint finds.
    """
    if dist.is_initialized():
        # Statistics kept per process (VisualSA's on CPUs) differ by each rank's last batch. Training is not
        # changed by this: DDP gives every rank rank 0's buffers at the start of each training forward anyway.
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)
    image_loader, caption_loader, val_set = val_loaders
    metrics = evaluation.validate(unwrap(model), image_loader, caption_loader, val_set.relevance, device,
                                  precision_name=opt.precision)
    model.train()
    if metrics is None:
        return None
    i2t, t2i = metrics["i2t"], metrics["t2i"]
    log.info("validation  i2t R@1 %.1f R@5 %.1f R@10 %.1f ASP %.1f | t2i R@1 %.1f R@5 %.1f R@10 %.1f ASP %.1f | "
             "rsum %.1f", i2t["r1"], i2t["r5"], i2t["r10"], i2t["asp"], t2i["r1"], t2i["r5"], t2i["r10"],
             t2i["asp"], metrics["rsum"])
    scalars = {"r1": i2t["r1"], "r5": i2t["r5"], "r10": i2t["r10"], "medr": i2t["medr"], "meanr": i2t["meanr"],
               "ASP": i2t["asp"], "r1i": t2i["r1"], "r5i": t2i["r5"], "r10i": t2i["r10"], "medri": t2i["medr"],
               "meanri": t2i["meanr"], "ASPi": t2i["asp"], "r_sum": metrics["rsum"]}
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    writer.flush()
    return metrics["rsum"]


def rng_state(device):
    """This process's random number generators (dropout): {'torch': CPU state, 'cuda': the state of this
    process's GPU `device`, when it trains on one}, tensors.

    Only its own GPU: the generators of the other visible GPUs belong to other ranks (or to nobody), and a
    resume that sees fewer GPUs, or gives this rank another GPU index, must still find its own stream.
    """
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng_state(rng, device):
    """Set this process's generators from rng_state(): the CPU one, and `device`'s from the saved GPU state.

    Checkpoints written before states were saved per process hold a list, one state per GPU visible
    then; the one of this process's GPU index is taken (none when that GPU index is not in the list).
    """
    torch.set_rng_state(rng["torch"])
    saved = rng.get("cuda")
    if device.type != "cuda" or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if device.index >= len(saved):
            return
        saved = saved[device.index]
    torch.cuda.set_rng_state(saved, device)


def every_rank_rng_state(distributed, device):
    """Every process's rng_state(), in rank order, on rank 0 (None on the others); None in a one-process
    run. Every rank must call it: each process draws its own dropout, so an exact resume of K processes
    needs all K states, and only rank 0 writes the checkpoint."""
    if not distributed:
        return None
    states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rng_state(device), states, dst=0)
    return states


def checkpoint_state(opt, model, optimizer, scaler, vocab, epoch, best_rsum, iterations, rng_ranks, device):
    """The original's checkpoint keys plus what an exact resume needs (all plain types): `rng` is this
    process's (rank 0's, on `device`) RNG state, `rng_ranks` (runs of K > 1 processes only) every rank's."""
    state = {"epoch": epoch, "model": [add_module_prefix(state) for state in unwrap(model).state_dicts()],
             "best_rsum": best_rsum, "opt": opt, "Eiters": iterations, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng_state(device), "vocab": dict(vocab.word2idx)}
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    return state


# ------------------------------------------------------------------------------------------------
# One process of the run


def train_process(rank, opt, init_method):
    """Everything one process does: data, model, the epochs; rank 0 validates, logs and saves."""
    distributed = process_count(opt) > 1
    configure_logging(rank)
    if opt.deterministic:
        use_deterministic_algorithms()
    if distributed:
        device = init_group(rank, process_count(opt), init_method, device_type(opt), opt.dist_timeout, opt.threads)
    else:
        set_threads(opt.threads)
        device = process_device(device_type(opt), rank)
    pin = device.type == "cuda"  # page-locked batches copy to a GPU asynchronously; on a CPU they only cost

    vocab = deserialize_vocab(vocab_file(opt))
    opt.vocab_size = len(vocab)
    torch.manual_seed(opt.seed)  # identical initial weights on every rank
    train_loader = data.get_train_loader(opt, vocab, distributed, pin_memory=pin)
    max_captions = 5 * opt.val_images if opt.val_images else None
    val_loaders = data.get_eval_loaders(opt.data_path, opt.data_name, "dev", vocab, opt.batch_size,
                                        opt.workers, max_captions=max_captions, pin_memory=pin)

    model = SimilarityModel(opt).to(device)
    start_epoch, best_rsum, iterations, ckpt = 0, 0.0, 0, None
    if opt.resume or opt.init_from:
        ckpt = load_start_checkpoint(opt, opt.resume or opt.init_from)
        model.load_state_dicts(ckpt["model"], opt.resume or opt.init_from)
    if distributed:
        model = distribute(model, device)
    criterion = build_criterion(opt)
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=opt.amp == "fp16")
    if opt.resume:
        if "optimizer" in ckpt:  # the original release's checkpoints hold weights only
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            # an --amp fp16 run goes on with its loss scale; a checkpoint of an fp32 or bf16 run (or the
            # original's) has none to give, and the scaler starts from its initial scale, as a new fp16 run
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_rsum, iterations = ckpt["epoch"], ckpt["best_rsum"], ckpt["Eiters"]
    saved_rng_ranks = ckpt.get("rng_ranks", []) if opt.resume else []
    if len(saved_rng_ranks) == process_count(opt):
        # every rank's RNG state is in the checkpoint (a run of as many processes): each continues its own
        restore_rng_state(saved_rng_ranks[rank], device)
    elif opt.resume and rank == 0 and "rng" in ckpt:
        # rank 0's RNG state is in the checkpoint: a single-process resume continues bit for bit
        restore_rng_state(ckpt["rng"], device)
    else:
        # dropout differs between ranks, as with independent GPUs, and between resumed epochs
        torch.manual_seed(opt.seed + 1 + rank + 1000 * start_epoch)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(opt.model_name, exist_ok=True)
        # purge_step: TensorBoard hides what an earlier (killed or resumed-from-before) session of the run
        # logged at or after the step where this one goes on, so no step appears twice
        writer = SummaryWriter(opt.logger_name, purge_step=iterations + 1 if opt.resume else None)
        log.info("options: %s", vars(opt))

    def save(name, epoch, rng_ranks):
        save_checkpoint(checkpoint_state(opt, model, optimizer, scaler, vocab, epoch, best_rsum, iterations,
                                         rng_ranks, device), os.path.join(opt.model_name, name))

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opt.amp)
    for epoch in range(start_epoch, opt.num_epochs):
        lr = set_learning_rate(opt, optimizer, epoch)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        max_violation = opt.max_violation and epoch >= opt.warmup_epochs
        model.train()
        batches = tqdm(train_loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True, leave=False)
        end = time.time()
        optimizer.zero_grad(set_to_none=True)
        step_losses = []  # the loss of each micro-batch of the coming step, on the device
        for i, (images, captions, lengths, _, image_ids, relevance) in enumerate(batches):
            data_time = time.time() - end
            last = (i + 1) % opt.accum_steps == 0 or i + 1 == len(train_loader)  # of the step's micro-batches
            with micro_batch(model, distributed, last):
                # lengths stay on the CPU: the forward packs and chunks by them on the host
                losses = compute_losses(model, criterion, images.to(device, non_blocking=pin),
                                        captions.to(device, non_blocking=pin), lengths,
                                        relevance.to(device, non_blocking=pin), max_violation, amp_dtype, image_ids)
                scaler.scale(losses["loss"] / opt.accum_steps).backward()
            step_losses.append(losses["loss"].detach())
            if not last:
                continue
            # One device-to-host copy per step (not one per value and micro-batch, each stalling the GPU's queue):
            # every micro-batch's loss, checked before the step so that a NaN never reaches the weights, and
            # the last micro-batch's values for the log.
            host = torch.stack(step_losses + [value.detach().float() for value in losses.values()]).tolist()
            diverged = [value for value in host[:len(step_losses)] if not math.isfinite(value)]
            step_losses = []
            if diverged:
                raise TrainingDiverged(
                    f"the loss became {diverged[0]} at epoch {epoch}, iteration {iterations + 1} "
                    f"(rank {rank}); stopped, the last good checkpoint in {opt.model_name} is untouched")
            optimizer_step(model, optimizer, scaler, opt.grad_clip)
            iterations += 1
            batch_time = time.time() - end
            end = time.time()
            if rank == 0:
                values = dict(zip(losses, host[-len(losses):]))
                batches.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
                if iterations % opt.log_step == 0:
                    for name, value in values.items():
                        writer.add_scalar(name, value, iterations)
                    for name, value in (("lr", lr), ("batch_time", batch_time), ("data_time", data_time),
                                        ("epoch", epoch)):
                        writer.add_scalar(name, value, iterations)
                    log.info("epoch %d [%d/%d] %s batch %.3fs data %.3fs", epoch, i + 1, len(train_loader),
                             " ".join(f"{k} {v:.4f}" for k, v in values.items()), batch_time, data_time)
            if iterations % opt.val_step == 0:
                # logged only, as in the original: model_best is chosen among the end-of-epoch validations
                validate(opt, model, val_loaders, device, writer, iterations)
        # end of epoch: validate, then save checkpoint_{epoch} and, when best, model_best
        rsum = validate(opt, model, val_loaders, device, writer, iterations)
        rng_ranks = every_rank_rng_state(distributed, device)
        if rank == 0:
            is_best = rsum > best_rsum
            best_rsum = max(rsum, best_rsum)
            save(f"checkpoint_{epoch}.pth.tar", epoch + 1, rng_ranks)
            if is_best:
                save("model_best.pth.tar", epoch + 1, rng_ranks)
    if rank == 0:
        writer.close()
        log.info("done: best rsum %.2f, checkpoints in %s", best_rsum, opt.model_name)
    if distributed:
        dist.barrier()  # no process leaves while rank 0 still writes the last checkpoint
        dist.destroy_process_group()


def distributed_process(rank, opt, init_method):
    """Entry point of one process of a K-process run, started by --world_size or by torchrun (one or
    several machines): turn failures into one line and an exit code, never a traceback."""
    try:
        with lost_peer_exits(rank, "training"):
            train_process(rank, opt, init_method)
    except InputError as err:
        print(f"error: rank {rank}: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: rank {rank}: training diverged: {err}", file=sys.stderr)
        sys.exit(3)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    opt = opts.parse_opt(argv)
    given = opts.given_options(argv)
    configure_logging(0)
    if opt.resume and given.get("init_from"):
        raise InputError("--resume and --init_from exclude each other (resume continues a run, init_from starts one)")
    if opt.resume:
        opt, ckpt = resume_options(opt, given)
    check_module_options(opt, given)
    check_options(opt)
    # Fail here, in one process, on what every process would fail on: names, vocabulary, data, checkpoint.
    dataset_dir(opt.data_path, opt.data_name)
    vocab = deserialize_vocab(vocab_file(opt))
    train_set = data.PrecompDataset(opt.data_path, opt.data_name, "train", vocab)
    if opt.batch_size > len(train_set):
        raise InputError(f"--batch_size {opt.batch_size} is larger than the {len(train_set)} training captions of "
                         f"{os.path.join(opt.data_path, opt.data_name)}")
    dev_set = data.PrecompDataset(opt.data_path, opt.data_name, "dev", vocab,
                                  5 * opt.val_images if opt.val_images else None)
    img_dim, model_source = opt.img_dim, f"a model with --img_dim {opt.img_dim}"
    if opt.resume or opt.init_from:
        start = opt.resume or opt.init_from
        ckpt = load_start_checkpoint(opt, start)
        check_vocab(ckpt, start, vocab, vocab_file(opt))
        img_dim, model_source = ckpt["opt"].img_dim, f"the model of {start}"
    for dataset in (train_set, dev_set):
        data.check_features(dataset.features, img_dim, model_source)
    for folder in (opt.model_name, opt.logger_name):
        check_output(folder, folder=True)
    check_run_folders(opt)
    if opt.resume and ckpt.get("epoch", 0) >= opt.num_epochs:
        log.info("%s: the run is complete (finished epochs: %d, --num_epochs %d), nothing to train; give a larger "
                 "--num_epochs to train on", opt.resume, ckpt["epoch"], opt.num_epochs)
        return

    if launched_by_torchrun():
        distributed_process(int(os.environ["RANK"]), opt, "env://")
    elif opt.world_size > 1:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        try:
            processes = mp.spawn(distributed_process, args=(opt, init_method), nprocs=opt.world_size, join=False)
            # When one process fails, the others get 2 s to leave, then SIGTERM, then SIGKILL (the default 30 s
            # per step would keep a hung peer alive for a minute; checkpoints are atomic, nothing is lost).
            while not processes.join(grace_period=2):
                pass
        except mp.ProcessExitedException as err:
            raise InputError(f"training process {err.error_index} stopped (exit code {err.exit_code}); "
                             f"the run was ended, see the lines above") from None
        except mp.ProcessRaisedException as err:
            raise InputError(f"a training process failed: {str(err).strip().splitlines()[-1]}") from None
    else:
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        try:
            train_process(0, opt, None)
        finally:  # --threads and --deterministic are this run's: an in-process caller keeps its own
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    sys.exit(run(main))
