"""Distributed setup in one place: read torchrun's environment once, pass the result around."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train.config import ConfigError

COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torchrun keeps one store across --max-restarts attempts; without a per-attempt prefix the
        # restarted workers can read the dead workers' addresses and hang while connecting.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt-{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device if backend == "nccl" else None,
        )
    return DistContext(rank, world_size, local_rank, device)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks in place (no-op on one process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place.

    DDP broadcasts them only at the start of each training forward, so after an epoch's last step
    each rank holds statistics updated by its own last batch. Evaluated as they are, the ranks would
    be scoring slightly different models, none of them the one rank 0 checkpoints.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@contextlib.contextmanager
def fail_together(ctx: DistContext, kinds: tuple[type[Exception], ...]) -> Iterator[None]:
    """Run a block of per-rank work (no collectives inside) and leave it on every rank alike.

    If the block raises on some ranks (a node without the shards, a run.dir that rank 0 cannot
    lock), every rank raises: the failing ranks their own error, the others an error of the same
    kind (one of `kinds`, else RuntimeError) naming the first failing rank, its host and its message.
    Without this the others would go on to their first collective and wait there: seconds with
    gloo, up to the collective timeout with NCCL.
    """
    if not ctx.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # reported to the other ranks below, then raised again
        error = err
    report = None if error is None else (type(error).__name__, str(error))
    reports = all_gather_objects((ctx.rank, socket.gethostname(), report), ctx)
    if error is not None:
        raise error
    for rank, host, failure in reports:
        if failure is not None:
            name, message = failure
            kind = next((k for k in kinds if k.__name__ == name), None)
            if kind is None:
                raise RuntimeError(f"rank {rank} on {host} failed: {name}: {message}")
            raise kind(f"rank {rank} on {host}: {message}")


def require_agreement(facts: dict[str, object], ctx: DistContext, advice: str) -> None:
    """Raise ConfigError on every rank, one clause per difference, unless all ranks hold the same `facts`."""
    differing = disagreements(facts, ctx)
    if differing:
        raise ConfigError(f"the ranks were not given the same run ({'; '.join(differing)}): {advice}")


def disagreements(facts: dict[str, object], ctx: DistContext) -> list[str]:
    """Compare each rank's `facts` (name -> value) across ranks: one line per name not held alike.

    A line names each value with the ranks (and their hosts) that hold it, e.g.
    "optim.lr: 0.1 on rank 0 (node-a); 0.2 on rank 1 (node-b)". Empty when every rank agrees.
    """
    gathered = all_gather_objects((socket.gethostname(), facts), ctx)
    lines = []
    for name in sorted({name for _, rank_facts in gathered for name in rank_facts}):
        holders: dict[str, list[tuple[int, str]]] = {}
        for rank, (host, rank_facts) in enumerate(gathered):
            holders.setdefault(repr(rank_facts.get(name, "(not set)")), []).append((rank, host))
        if len(holders) > 1:
            lines.append(f"{name}: " + "; ".join(f"{value} on {_ranks(ranks)}" for value, ranks in holders.items()))
    return lines


def _ranks(ranks: list[tuple[int, str]]) -> str:
    hosts = ", ".join(dict.fromkeys(host for _, host in ranks))
    numbers = [rank for rank, _ in ranks]
    if len(numbers) == 1:
        return f"rank {numbers[0]} ({hosts})"
    shown = ", ".join(map(str, numbers[:8])) + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")
    return f"ranks {shown} ({hosts})"
