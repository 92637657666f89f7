"""The GPU code paths, checked on a CPU: what can fail only on a GPU is simulated (device counts, a
visible CUDA, fp16), everything else runs for real on the tiny synthetic data.

- an --amp fp16 run resumes a checkpoint without a loss scaler state (an fp32 run's), and an fp16 run
  resumes with its own scale;
- RNG states: only this process's GPU is saved and restored (a machine with fewer GPUs, another GPU index);
- torchrun or --world_size with more processes than GPUs is an error, nccl is bound to the process's GPU;
- evaluation.py --world_size 2 --workers 2 (ranks that may start loader workers) and the cause of a rank's
  failure in rank 0's message;
- pinned memory only for a CUDA device; cuDNN's TF32 off under --precision fp32; --deterministic;
- the chunk budget by device; fp16 epsilons; DDP's no_sync on all but a step's last micro-batch.
"""
import argparse
import os
import queue
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

import data
import distributed
import encoders
import errors
import evaluation
import model as model_lib
import train
from errors import InputError
from tests.test_train import load, scores, short, short_argv  # noqa: F401 (short: the module's fixture)

ONE_EPOCH = ["--batch_size", "20", "--num_epochs", "1", "--val_images", "5", "--daa_weight", "1"]


@pytest.fixture(scope="module")
def fp32_run(synth, short, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """One epoch (10 batches) of an fp32 run on the short copy: its folder."""
    out = tmp_path_factory.mktemp("fp32_run")
    assert errors.run(train.main, short_argv(synth, short, out) + ONE_EPOCH) == 0
    return out


def allow_fp16_on_cpu(monkeypatch):
    """Let train.py run --amp fp16 on the CPU (torch autocasts to fp16 and scales losses there too):
    check_options refuses it, as a real run should, so it checks the other options only."""
    check = train.check_options

    def check_options(opt):
        amp, opt.amp = opt.amp, "bf16"
        try:
            check(opt)
        finally:
            opt.amp = amp

    monkeypatch.setattr(train, "check_options", check_options)


def record_first_step(monkeypatch):
    """{"scale": the loss scale, "optimizer_state": Adam's state entries} at the run's first optimizer step."""
    seen = {}
    step = train.optimizer_step

    def optimizer_step(model, optimizer, scaler, grad_clip):
        if not seen:
            seen.update(scale=scaler.get_scale() if scaler.is_enabled() else None,
                        optimizer_state=len(optimizer.state))
        return step(model, optimizer, scaler, grad_clip)

    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    return seen


def test_fp16_resumes_a_checkpoint_without_scaler_state(fp32_run, synth, short, tmp_path, monkeypatch):  # noqa: F811
    """--amp fp16 resumes an fp32 run (whose checkpoint's scaler state is empty) from the initial scale;
    a resumed fp16 run goes on with its own scale."""
    allow_fp16_on_cpu(monkeypatch)
    fp32_ckpt = fp32_run / "run" / "checkpoint_0.pth.tar"
    assert load(fp32_ckpt)["scaler"] == {}
    first = record_first_step(monkeypatch)
    argv = ["--resume", str(fp32_ckpt), "--model_name", str(tmp_path / "fp16"), "--logger_name", str(tmp_path / "log1"),
            "--amp", "fp16", "--num_epochs", "2"]
    assert errors.run(train.main, argv) == 0
    assert first["scale"] == torch.amp.GradScaler("cpu").get_scale() == 65536.0
    fp16_ckpt = load(tmp_path / "fp16" / "checkpoint_1.pth.tar")
    assert fp16_ckpt["epoch"] == 2 and fp16_ckpt["opt"].amp == "fp16"
    saved_scale = fp16_ckpt["scaler"]["scale"]

    first.clear()
    argv = ["--resume", str(tmp_path / "fp16" / "checkpoint_1.pth.tar"), "--logger_name", str(tmp_path / "log2"),
            "--num_epochs", "3"]
    assert errors.run(train.main, argv) == 0
    assert first["scale"] == saved_scale


class FakeCuda:
    """`count` visible GPUs, each with its own generator state (a distinct byte tensor), for torch.cuda's
    RNG functions; asking for a GPU that is not there fails as torch does ("invalid device ordinal")."""

    def __init__(self, monkeypatch, count):
        self.count = count
        self.states = {i: torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get_rng_state(i) for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [self.set_rng_state(s, i) for i, s in enumerate(states)])

    def index(self, device):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index is None or index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()


def test_rng_state_is_this_process_gpu_only(monkeypatch):
    """Saved by the process of cuda:2 on a 4-GPU machine, restored by the process of cuda:0 on a 2-GPU one:
    its own stream comes back, on its own GPU, and no other GPU's generator is touched."""
    four = FakeCuda(monkeypatch, 4)
    cpu_state = torch.get_rng_state()
    saved = train.rng_state(torch.device("cuda", 2))
    assert torch.equal(saved["cuda"], four.states[2])  # one state, not one per visible GPU
    assert torch.equal(saved["torch"], cpu_state)

    torch.manual_seed(123)  # the CPU generator moves on before the resume
    two = FakeCuda(monkeypatch, 2)
    untouched = two.states[1].clone()
    train.restore_rng_state(saved, torch.device("cuda", 0))
    assert torch.equal(two.states[0], four.states[2]) and torch.equal(two.states[1], untouched)
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_rng_states_of_older_checkpoints_give_each_gpu_its_own(monkeypatch):
    """Checkpoints written before hold one state per GPU visible then: the process of cuda:1 takes entry 1,
    also on a machine that sees fewer GPUs than were saved."""
    gpus = FakeCuda(monkeypatch, 2)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.full((16,), 50 + i, dtype=torch.uint8) for i in range(4)]}
    train.restore_rng_state(old, torch.device("cuda", 1))
    assert torch.equal(gpus.states[1], old["cuda"][1]) and gpus.states[0][0] == 10


def torchrun_env(monkeypatch, local_rank, local_world_size):
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", local_world_size), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_world_size)):
        monkeypatch.setenv(name, str(value))


def test_more_processes_than_gpus_is_an_error(monkeypatch):
    """torchrun --nproc_per_node 3 on a 2-GPU machine: the check and the third process say so, instead of
    putting two processes on one GPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    torchrun_env(monkeypatch, 2, 3)
    with pytest.raises(InputError, match=r"torchrun --nproc_per_node 3: .* only 2 CUDA device"):
        distributed.check_world_size(3, "cuda")
    with pytest.raises(InputError, match="process 2 of this machine has no GPU of its own"):
        distributed.process_device("cuda", 2)
    torchrun_env(monkeypatch, 1, 2)
    distributed.check_world_size(2, "cuda")
    assert distributed.process_device("cuda", 1) == torch.device("cuda", 1)


def test_nccl_group_is_bound_to_the_process_gpu(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    device = distributed.init_group(1, 2, "tcp://127.0.0.1:1", "cuda")
    assert device == torch.device("cuda", 1)
    assert calls[0][0] == "nccl" and calls[0][1]["device_id"] == torch.device("cuda", 1)


def test_cpu_runs_never_pin_memory(fp32_run, synth, short, tmp_path, monkeypatch):  # noqa: F811
    """With a GPU visible, --device cpu training and evaluation build no loader that pins its batches (pinning
    needs a CUDA context in every process that pins, for copies that never happen)."""
    pinned = []

    class DataLoader(data.DataLoader):
        def __init__(self, *args, **kwargs):
            pinned.append(kwargs.get("pin_memory", False))
            super().__init__(*args, **{**kwargs, "pin_memory": False})  # this torch has no CUDA to pin with

    monkeypatch.setattr(data, "DataLoader", DataLoader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert errors.run(train.main, short_argv(synth, short, tmp_path) + ONE_EPOCH) == 0
    assert scores(str(fp32_run / "run" / "checkpoint_0.pth.tar"), synth, "test")["rsum"] > 0
    assert len(pinned) == 5 and not any(pinned)  # train, dev images and captions, test images and captions


def test_evaluation_ranks_can_start_loader_workers(fp32_run, synth, tmp_path):
    """evaluation.py --world_size 2 --workers 2: each rank's loaders start worker processes; the matrix is
    the one-process one bit for bit (1 thread each, as the ranks run)."""
    ckpt = str(fp32_run / "run" / "checkpoint_0.pth.tar")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scores(ckpt, synth, "test", "--shard_size", "10", "--save_sims", str(tmp_path / "one.npy"))
    finally:
        torch.set_num_threads(threads)
    scores(ckpt, synth, "test", "--shard_size", "10", "--save_sims", str(tmp_path / "two.npy"), "--world_size", "2",
           "--workers", "2")
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))


def test_a_failed_rank_reports_its_cause(monkeypatch):
    """A spawned rank puts its failure on the queue as one line (rank 0's own error would only say that a
    peer closed the connection) and exits with 2; rank 0 takes that line and ends every rank."""
    def fail(*args, **kwargs):
        raise InputError("data/f30k_precomp/test_ims.npy: feature file not found")

    monkeypatch.setattr(distributed, "init_group", lambda *args, **kwargs: None)
    failures = queue.SimpleQueue()
    with pytest.raises(SystemExit) as exit_:
        distributed.spawned_rank(1, 2, "tcp://x", "cpu", 0, failures, fail, (argparse.Namespace(), []))
    assert exit_.value.code == 2

    class Rank:  # a spawned rank: one that failed and left, or one still waiting in a collective
        def __init__(self, alive):
            self.alive, self.ended = alive, False

        def is_alive(self):
            return self.alive

        def terminate(self):
            self.alive, self.ended = False, True

        def join(self):
            pass

    ranks = [Rank(False), Rank(True)]
    assert distributed.end_ranks(ranks, failures) == "rank 1: data/f30k_precomp/test_ims.npy: feature file not found"
    assert all(r.ended and not r.alive for r in ranks) and failures.empty()
    assert distributed.end_ranks([Rank(True)], failures, wait_s=0.2) is None  # nothing reported: rank 0's own error


def test_precision_fp32_turns_cudnn_tf32_off():
    before = torch.backends.cudnn.allow_tf32
    for name, inside in (("fp32", False), ("tf32", True), ("bf16", False)):
        with evaluation.precision(name, torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32 is inside
        assert torch.backends.cudnn.allow_tf32 is before


def test_deterministic_run_equals_the_default_run_on_cpu(fp32_run, synth, short, tmp_path, monkeypatch):  # noqa: F811
    """--deterministic: torch's deterministic algorithms and cuBLAS's fixed workspace during the run, the
    caller's setting afterwards; on a CPU the weights come out bit for bit as without it."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    compute = train.compute_losses
    monkeypatch.setattr(train, "compute_losses", lambda *a, **k: seen.append(
        torch.are_deterministic_algorithms_enabled()) or compute(*a, **k))
    assert errors.run(train.main, short_argv(synth, short, tmp_path) + ONE_EPOCH + ["--deterministic"]) == 0
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    ours, default = (load(folder / "run" / "checkpoint_0.pth.tar")["model"] for folder in (tmp_path, fp32_run))
    for a, b in zip(ours, default):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunk_budget_by_device(monkeypatch):
    """The CPU keeps MAX_ELEMENTS; a GPU gets 1/128 of its memory in fp32 floats (never less)."""
    assert model_lib.chunk_budget(torch.device("cpu")) == model_lib.MAX_ELEMENTS == 2 ** 23
    for memory, expected in ((80 * 10 ** 9, 80 * 10 ** 9 // 512), (2 * 10 ** 9, 2 ** 23)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=memory))
        assert model_lib.chunk_budget(torch.device("cuda", 0)) == expected


def test_fp16_zero_vectors_stay_finite():
    """In fp16 the original's eps (1e-8) rounds to 0: an all-zero vector or context gave 0 / 0 = NaN. fp32
    computes as before (compared with the formula written out)."""
    zero = torch.zeros(3, 8, dtype=torch.float16)
    assert torch.equal(encoders.l2norm(zero), zero) and torch.equal(encoders.l1norm(zero, 1), zero)
    x = torch.randn(5, 8)
    assert torch.equal(encoders.l2norm(x), x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-8))
    assert torch.equal(encoders.l1norm(x, 1), x / (x.abs().sum(1, keepdim=True) + 1e-8))

    gen = torch.Generator().manual_seed(0)
    aT = torch.rand(2, 36, 5, generator=gen)
    V, w = torch.randn(2, 36, 8, generator=gen), torch.randn(5, 8, generator=gen)
    V[0] = 0  # image 0's regions are all zero: every context of its words is zero
    weight, bias = torch.randn(4, 8, generator=gen), torch.zeros(4)
    half = model_lib.local_alignment(*(t.half() for t in (aT, V, w, weight, bias)))
    assert torch.isfinite(half).all()
    # the zero context's nodes: W (0 - w)^2 + b, as in fp32
    expected = torch.nn.functional.linear(w.square(), weight, bias)
    torch.testing.assert_close(half[0].float(), expected, rtol=2e-2, atol=2e-2)


def test_ddp_all_reduces_once_per_step(tmp_path):
    """train.micro_batch: with DDP, the micro-batches before a step's last skip the all-reduce (no_sync),
    the last one runs it; the accumulated gradient is the sum of the micro-batches' (one process here)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{distributed.free_port()}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(3, 1)
        ddp = torch.nn.parallel.DistributedDataParallel(layer)
        reduced = []

        def hook(state, bucket):
            reduced.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, hook)
        inputs = [torch.full((2, 3), float(k + 1)) for k in range(3)]
        for k, x in enumerate(inputs):
            with train.micro_batch(ddp, True, last=k == 2):
                ddp(x).sum().backward()
            assert len(reduced) == (1 if k == 2 else 0)
        expected = sum(x.sum(0) for x in inputs)  # d/dW of sum(W x + b) over the rows, summed over micro-batches
        torch.testing.assert_close(layer.weight.grad[0], expected)
        assert train.micro_batch(layer, False, last=False).__class__.__name__ == "nullcontext"
    finally:
        dist.destroy_process_group()
