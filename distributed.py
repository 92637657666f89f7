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


def free_port():
    """An unused TCP port on the loopback interface for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_group(rank, world_size, init_method, device_type, timeout_s=1800):
    """Join the process group: nccl when the processes use GPUs, gloo otherwise."""
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def rank_and_world():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_device(device_type, rank):
    """The device of process `rank`: its own GPU (round robin over the visible ones) or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    torch.cuda.set_device(device)
    return device
