"""Data parallelism over `torch.distributed`: shard the work, then one float64 all-reduce.

rwasym's statistics are plain float64 sums (`rwasym.math.covariance.RunningCovariance`: N, Σ a, Σ a aᵀ;
`rwasym.hooks.gradients.GradientStats`: also G = Σ δ aᵀ), so a corpus splits across processes
exactly: rank r streams the batches i with i mod world_size = r, and one all-reduce (a sum) of
every accumulator gives each rank the statistics of the whole corpus, equal to a single-process
run up to float64 rounding of the summation order.

Launch with ``torchrun --nproc-per-node N -m rwasym ...``; `init_from_env` reads torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK). Everything here is a
no-op in a single process, so library code calls these helpers unconditionally.
"""

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RwasymError

__all__ = ["all_reduce_sum_", "barrier", "destroy", "init_from_env", "is_distributed", "require_same", "shard", "world"]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return world()[1] > 1


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment when WORLD_SIZE > 1.

    Backend: ``gloo`` for CPU tensors, plus ``nccl`` for CUDA tensors when CUDA is available
    (``"cpu:gloo,cuda:nccl"``), so statistics reduce on whichever device they live; with CUDA
    the process also selects GPU LOCAL_RANK. Idempotent: returns True only when this call
    initialised the group, False when WORLD_SIZE is unset / 1 or a group already exists.
    """
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RwasymError(
            f"WORLD_SIZE must be an integer; got {os.environ['WORLD_SIZE']!r}. Launch with torchrun, which sets it."
        ) from None
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RwasymError(
            f"WORLD_SIZE={size} but this torch build has no torch.distributed; run one "
            "process (without torchrun) or install a torch build with distributed support"
        )
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RwasymError(
            f"WORLD_SIZE={size} but {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc-per-node N -m rwasym ...`, which sets them"
        )
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    return True


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place (as float64) and return it; no-op with one rank.

    The sum runs on the tensor's own device, except under an nccl-only group, where CPU tensors
    travel to the current CUDA device and back. Non-float64 tensors are reduced in float64 and
    written back in their own dtype.
    """
    if not is_distributed():
        return tensor
    work = tensor if tensor.dtype == torch.float64 else tensor.to(torch.float64)
    if work.device.type == "cpu" and dist.get_backend() == "nccl":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    work = work.contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of rank ``rank`` out of ``world_size``: indices i with i mod world_size = rank.

    Deterministic striding, so the ranks' shards partition ``items`` and their union in index
    order is ``items``. Example: ``shard("abcde", 1, 2) == ["b", "d"]``.
    """
    if not 0 <= rank < world_size:
        raise RwasymError(f"shard needs 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def require_same(values: Sequence[float], what: str) -> None:
    """Raise RwasymError unless every rank passes the same ``values`` (one small all-reduce).

    Guards against ranks that were given different data: each rank writes its values into its
    own row of a (world_size, k) float64 table, the table is summed, and the rows are compared.
    """
    rank, size = world()
    if size == 1:
        return
    table = torch.zeros(size, len(values), dtype=torch.float64)
    table[rank] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum_(table)
    if not bool((table == table[0]).all()):
        per_rank = "; ".join(f"rank {r}: {table[r].tolist()}" for r in range(size))
        raise RwasymError(
            f"the ranks disagree on {what} ({per_rank}); every rank must be given the same "
            "data (same batches in the same order): pass the same files / arguments to every "
            "process"
        )


def destroy() -> None:
    """Tear down the default process group (after `init_from_env` returned True)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op with one rank)."""
    if is_distributed():
        dist.barrier()
