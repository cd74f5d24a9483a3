"""Process setup. There is always a process group, also for `python train_x.py` (world size 1), so the
single-GPU path and the torchrun path are the same code (FSDP2 with one shard is still FSDP2)."""
import os
import socket

import torch
import torch.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def init():
    """Init the default process group (nccl on GPU, gloo on CPU). Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:  # plain `python script.py`: be a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"  # gloo for the CPU-side collectives of checkpointing
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **kw):
    if is_main():
        print(*a, **kw, flush=True)


def cleanup():
    if dist.is_initialized():
        dist.barrier()  # without it, gloo sometimes aborts in destroy_process_group with 2+ ranks
        dist.destroy_process_group()
