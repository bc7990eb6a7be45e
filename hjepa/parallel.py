"""torch.distributed set-up for torchrun: NCCL on GPU, gloo on CPU; rank 0 does the talking."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hjepa.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1 or dist.is_initialized()


def resolve_device(choice, local_rank=0):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("hardware.device=cuda but no CUDA GPU is visible; use --hardware.device=cpu (or auto)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if choice == "cuda" else torch.device("cpu")


def init_distributed(enabled, device_choice):
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK; returns (Dist, device)."""
    if not enabled:
        return Dist(), resolve_device(device_choice)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("hardware.distributed=1 needs torchrun: torchrun --nproc_per_node=N hjepa/train.py ...")
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_choice, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def broadcast_object(obj, info):
    """Rank 0's value of a small picklable object on every rank (e.g. the run folder name)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor, info):
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup_distributed(info):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_tensor(tensor, info):
    """Every rank's copy of an equally shaped tensor, as a list indexed by rank."""
    if not info.enabled:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor)
    return parts


def parameter_checksum(module):
    """A float64 sum of every parameter; ranks of a healthy DDP run agree on it exactly."""
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
