"""torch.distributed plumbing shared by train.py and evaluation.py: rendezvous, process group, rank, the
processes evaluation.py starts, and what a process says when it loses a peer.

Both scripts start K processes themselves when given `--world_size K` (a free loopback port is the
rendezvous, never a hard-coded one), or join a group that `torchrun` set up through its environment
variables. nccl runs on GPUs, gloo on CPUs.
"""
import contextlib
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from errors import InputError


def free_port():
    """An unused TCP port on the loopback interface for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world_size(world_size, device_type):
    """InputError when the processes on this machine would need more GPUs than it has: `world_size`
    processes started by --world_size, or torchrun's LOCAL_WORLD_SIZE (--nproc_per_node). Two processes on
    one GPU would fail in nccl ("duplicate GPU") or, worse, share its memory and run at half speed."""
    if device_type != "cuda":
        return
    local = processes_on_this_machine(world_size)
    if local > torch.cuda.device_count():
        what = f"torchrun --nproc_per_node {local}" if launched_by_torchrun() else f"--world_size {world_size}"
        raise InputError(f"{what}: one process per GPU, but only {torch.cuda.device_count()} CUDA device(s) "
                         f"are visible")


def init_group(rank, world_size, init_method, device_type, timeout_s=1800, threads=0):
    """Join the process group: nccl when the processes use GPUs, gloo otherwise; then set_threads.

    Returns this process's device (process_device). nccl gets it as `device_id`, which binds the
    communicator to this GPU at once instead of guessing it at the first collective (where a process
    whose current device was never set would open a context on GPU 0).
    """
    device = process_device(device_type, rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    set_threads(threads, processes_on_this_machine(world_size) if device_type != "cuda" else 1)
    return device


def processes_on_this_machine(world_size):
    """How many of the group's `world_size` processes share this machine's cores: under torchrun its
    LOCAL_WORLD_SIZE (--nproc_per_node; the other machines' processes have cores of their own), else all."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if launched_by_torchrun() else world_size


def set_threads(threads, cpu_processes=1):
    """torch's CPU threads in this process: `threads` when given (--threads > 0).

    Otherwise one of K > 1 CPU processes gets its share of the cores (unless OMP_NUM_THREADS says),
    since K processes with a thread per core each oversubscribe the machine K times (measured on 2 busy
    cores, 2 processes: 5.9 s a training step with 2 threads each, 0.15 s with 1); a single process
    keeps torch's default, one thread per core.
    """
    if threads:
        torch.set_num_threads(threads)
    elif cpu_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_processes))


def rank_and_world():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_device(device_type, rank):
    """The device of process `rank`: its own GPU or the CPU.

    Under torchrun the GPU is LOCAL_RANK (the rank within this node, multi-node runs included);
    otherwise the processes of this machine are ranks 0..K-1, one GPU each. A local rank without a GPU
    of its own is an InputError (never a second process on a GPU that another rank already uses).
    """
    if device_type != "cuda":
        return torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"]) if launched_by_torchrun() else rank
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"process {local_rank} of this machine has no GPU of its own: only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible (one process per GPU)")
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def lost_peer_exits(rank, role):
    """Around the work of process `rank` of a `role` ("training", "evaluation") group: a RuntimeError
    (DistBackendError among them) while the group is up means a peer is gone, or hung past the group's
    timeout. The process says so in one line on stderr, never a traceback from inside torch.distributed, and
    exits with 3 at once (os._exit: destroy_process_group would wait for the dead peer)."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as err:
        if not dist.is_initialized():
            raise
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        print(f"error: rank {rank}: lost contact with another {role} process ({detail})", file=sys.stderr)
        os._exit(3)


def describe(err):
    """One line for an exception: an InputError's message, else its type and first line."""
    if isinstance(err, InputError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def spawned_rank(rank, world_size, init_method, device_type, threads, failures, work, work_args):
    """A process started by run_spawned: join the group, do this rank's share, `work(*work_args)`, then leave.

    Rank 0 would see only that a peer is gone ("Connection closed by peer"), so this process puts the
    cause of its failure on `failures` (a queue) as one line for rank 0 to report, and exits with 2.
    """
    try:
        init_group(rank, world_size, init_method, device_type, threads=threads)
        work(*work_args)
    except BaseException as err:
        failures.put(f"rank {rank}: {describe(err)}")
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def end_ranks(workers, failures, wait_s=10.0):
    """End the spawned ranks after rank 0 failed; returns the first failure one of them reported, or None.

    A rank that failed first reports and exits at once: it is waited for up to `wait_s` seconds (the ones
    still running wait for rank 0 in a collective, until the group's timeout, and are terminated).
    """
    deadline = time.monotonic() + wait_s
    while failures.empty() and any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in workers:
        worker.terminate()
        worker.join()
    return None if failures.empty() else failures.get()


def run_spawned(world_size, device_type, threads, role, work, *work_args):
    """`world_size` processes on this machine each run `work(*work_args)` (a module-level function: the
    spawned ones get it pickled): this process is rank 0 and starts ranks 1..K-1. Returns rank 0's result;
    a failure of any rank is an InputError naming the first cause ("an {role} process failed: ...").

    The ranks are not daemon processes: a daemon cannot start children, i.e. data loader workers
    (--workers > 0). Every way out of here ends them, so none outlives rank 0.
    """
    check_world_size(world_size, device_type)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    failures = context.SimpleQueue()
    workers = [context.Process(target=spawned_rank, args=(rank, world_size, init_method, device_type, threads,
                                                          failures, work, work_args))
               for rank in range(1, world_size)]
    for worker in workers:
        worker.start()
    try:
        init_group(0, world_size, init_method, device_type, threads=threads)
        result = work(*work_args)
    except (RuntimeError, dist.DistBackendError) as err:
        cause = end_ranks(workers, failures) or f"rank 0: {describe(err)}"
        raise InputError(f"an {role} process failed: {cause}") from None
    except BaseException:
        end_ranks(workers, failures, wait_s=0)  # they would wait for rank 0 in the gather until the group's timeout
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for worker in workers:
        worker.join()
    return result
