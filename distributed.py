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
    """InputError when `world_size` processes on CUDA would need more GPUs than this machine has.

    Under torchrun each process already has its GPU (LOCAL_RANK), so nothing is checked there.
    """
    if device_type == "cuda" and not launched_by_torchrun() and world_size > torch.cuda.device_count():
        raise InputError(f"--world_size {world_size}: only {torch.cuda.device_count()} CUDA device(s) available")


def init_group(rank, world_size, init_method, device_type, timeout_s=1800, threads=0):
    """Join the process group: nccl when the processes use GPUs, gloo otherwise; then set_threads."""
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    set_threads(threads, processes_on_this_machine(world_size) if device_type != "cuda" else 1)


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
    otherwise the processes of this machine are ranks 0..K-1, round robin over the visible GPUs.
    """
    if device_type != "cuda":
        return torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"]) if launched_by_torchrun() else rank
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    torch.cuda.set_device(device)
    return device
