"""Multi-process merges: ``torchrun --nproc-per-node N -m fusion_engine merge CONFIG OUT``.

This module holds the coordination (the process group, the split of the tasks, the exchange of
errors); :func:`fusion_engine.checkpoint.executor.run_plan` runs the protocol below with it.

Every rank builds the same plan and the same output layout (:func:`fusion_engine.io.plan_shards` depends only
on the plan), so the byte offset of every output tensor is known to all ranks before anything is read. Then:

1. rank 0 checks the output path, creates the hidden temp folder and every shard file (headers written, data
   regions allocated) and broadcasts the folder's path;
2. each rank merges a contiguous run of tasks, in layout order, holding about ``1/N`` of the bytes to move
   (inputs + output), and ``pwrite``\\ s each result at its planned offset in the shared shard files;
3. the ranks exchange their status; if every rank succeeded, rank 0 writes the index and the side files and
   renames the folder into place, otherwise it removes the folder and every rank raises.

Because the layout and the bytes of each tensor do not depend on which rank computed it (merges are
deterministic, randomness is keyed by tensor name), the result is byte-identical to a single-process merge
with the same ``out_shard_size``. The process group is only used for coordination: gloo on CPU, NCCL on GPU
(each rank then merges on ``cuda:LOCAL_RANK``). The output folder must be on a file system all ranks share.
"""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent or not a number), or the live group's size."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def split_by_bytes(costs: list[int], world_size: int) -> list[range]:
    """Contiguous ranges of task indices, one per rank, each holding about ``sum(costs) / world_size``.

    Task ``i`` goes to the rank whose share contains the midpoint of its bytes, so a rank's share is
    contiguous in layout order (its writes are sequential) and no task is split.
    """
    total = sum(costs)
    bounds = [0] * (world_size + 1)
    bounds[world_size] = len(costs)
    position = 0
    rank = 1
    for i, cost in enumerate(costs):
        midpoint = position + cost / 2
        while rank < world_size and midpoint >= total * rank / world_size:
            bounds[rank] = i
            rank += 1
        position += cost
    while rank < world_size:
        bounds[rank] = len(costs)
        rank += 1
    return [range(bounds[r], bounds[r + 1]) for r in range(world_size)]


def rank_device(device: str | torch.device, local_rank: int, device_count: int) -> torch.device:
    """The device a rank merges on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (modulo the GPUs present, so N ranks
    may share one GPU); an explicit ``cuda:K`` or ``cpu`` is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if device_count < 1:
            raise CheckpointError("--device cuda under torchrun, but no CUDA GPU is visible to this rank")
        device = torch.device("cuda", local_rank % device_count)
    return device


def group_backend(device: torch.device, local_world_size: int, device_count: int) -> str:
    """NCCL when every local rank has a GPU of its own, else gloo (NCCL refuses two ranks on one GPU; the
    group only carries small coordination messages, so gloo costs nothing measurable)."""
    if device.type == "cuda" and local_world_size <= device_count:
        return "nccl"
    return "gloo"


def init_group(device: str | torch.device) -> tuple[bool, torch.device]:
    """Join (or create) the process group for this rank's device (:func:`rank_device`, :func:`group_backend`).
    Returns whether this call created it (then the caller destroys it) and the rank's device."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CheckpointError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    count = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, local_rank, count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        backend = group_backend(device, local_world, count)
        if backend == "nccl":
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
        created = True
    return created, device


def broadcast(obj, src: int = 0):
    """``obj`` from rank ``src``, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any(error: Exception | None, rank: int, world: int, stage: str) -> None:
    """Share every rank's error; raise the local one, or a CheckpointError naming the failed ranks."""
    import torch.distributed as dist

    statuses = [None] * world
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        r, message = failed[0]
        raise CheckpointError(f"distributed merge failed while {stage} on rank {r} (of {world}): {message}")
