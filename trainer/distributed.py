"""More than one process: `torchrun --nproc_per_node=N trainer/train.py ...`.

The gates run inside the frozen UNet's attention hooks, not through a module's forward, so
DDP's reducer would never see them being used; their gradients are averaged across ranks
explicitly here, after every optimizer step's accumulation (NCCL on GPUs, gloo on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: NCCL needs CUDA tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params) -> None:
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def average_scalar(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t) / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a signal that reached one process)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast_parameters(self, params) -> None:
        """Every rank starts from rank 0's gates."""
        if self.size == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def init_world(cpu: bool) -> World:
    """The process group torchrun describes in the environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before ComfyUI picks its device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank, f"cuda:{local_rank}" if use_cuda else "cpu")


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
