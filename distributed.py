"""torch.distributed plumbing shared by train.py and evaluation.py: rendezvous, process group, rank.

Both scripts start K processes themselves when given `--world_size K` (a free loopback port is the
rendezvous, never a hard-coded one), or join a group that `torchrun` set up through its environment
variables. nccl runs on GPUs, gloo on CPUs.
"""
import datetime
import os
import socket

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
