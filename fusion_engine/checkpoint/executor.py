"""Run a :class:`~fusion_engine.checkpoint.plan.MergePlan`: stream every input tensor, merge, write, one task at a time.

Pipeline (per process)::

    reader thread:  pread inputs of task i+1 (.. i+max_in_flight-1)   [-> pinned slots -> H2D on a copy stream]
    main thread:    merge_tensors(inputs of task i)                   [kernels on the compute stream]
    writer thread:  pwrite output of task i-1 at its planned offset    [<- D2H on a copy stream into pinned slots]

The device staging (double-buffered pinned slots, copy streams, events) is :mod:`.transfer`. Nothing is
memory-mapped on the read path, so the resident set holds only tensors in flight. On the CPU that is about
``max_in_flight × models × T + 2 T`` plus the method's temporaries and a fixed overhead, where ``T`` is the
largest tensor in bytes (``max_in_flight=1``: ``(models + 1) × T``); on a GPU the host holds ``4 T`` of pinned
slots plus the CUDA context, whatever the read-ahead (its tensors wait in device memory). The output's layout
(which shard, which offset) is fixed from the plan before the first read (:func:`fusion_engine.io.plan_shards`),
so the bytes written do not depend on the order in which tensors finish, nor on how many processes wrote them:
under ``torchrun`` (``WORLD_SIZE > 1``) :mod:`fusion_engine.checkpoint.distributed` splits the tasks between ranks by bytes
and the result is identical to a single-process merge.

The output folder is built in a hidden sibling and renamed into place when complete
(:func:`fusion_engine.io.atomic_output_dir`): any error, or a kill, leaves no partial checkpoint.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ShapeMismatchError
from ..io.atomic import atomic_output_dir, check_output_not_input, commit_temp_dir, discard_temp_dir, make_temp_dir
from ..io.checkpoint import Checkpoints
from ..io.files import open_input
from ..io.writer import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_INDEX, ShardedWriter, ShardLayout, parse_size,
                         plan_shards, write_file_synced)
from ..lora import open_model_into, split_reference
from ..methods.api import merge_bound, merge_tensors
from ..methods.lines import scale_task_vector
from ..methods.registry import get as get_method
from ..ops._common import accum_dtype
from . import distributed
from .plan import SIDE_FILES, MergePlan, TensorTask
from .transfer import DeviceTransfer, SlotPool, transfer_for


@dataclass
class _Job:
    """One task with everything resolved before reading: output dtype and bytes of reads and writes."""

    task: TensorTask
    out_dtype: torch.dtype
    read_bytes: int
    write_bytes: int


def _reference_model(plan: MergePlan) -> str | None:
    for task in plan.tasks:
        if task.base_index is not None:
            return task.inputs[task.base_index].model
    return next(iter(plan.models), None)


def resolve_jobs(plan: MergePlan, ckpts) -> list[_Job]:
    """Every task of ``plan`` with its output dtype and byte counts (headers of the open ``ckpts`` only)."""
    jobs = []
    for task in plan.tasks:
        infos = []
        for ref in task.inputs:
            if ref.model not in ckpts:
                raise CheckpointError(f"output tensor {task.out_name!r}: model {ref.model!r} is not among the "
                                      f"plan's models")
            infos.append(ckpts[ref.model].info(ref.name))
        main = infos[task.base_index] if task.base_index is not None else (infos[0] if infos else None)
        out_dtype = task.out_dtype or plan.default_out_dtype or task.dtype or (main.dtype if main else None)
        if out_dtype is None:
            raise CheckpointError(f"output tensor {task.out_name!r} has no inputs and no out_dtype")
        numel = task.out_numel
        jobs.append(_Job(task, out_dtype, sum(i.nbytes for i in infos),
                         numel * torch.empty((), dtype=out_dtype).element_size()))
    return jobs


def _is_plain_copy(job: _Job, input_dtype: torch.dtype) -> bool:
    task = job.task
    return (task.method == "passthrough" and len(task.inputs) == 1 and input_dtype == job.out_dtype
            and all(v is None or v == 1 or v == [1] or v == [1.0] for v in task.parameters.values()))


def merge_job(job: _Job, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The output tensor of ``job`` from its input tensors (on any device): what the merge writes."""
    task = job.task
    if task.vocabulary is not None:  # embeddings / LM heads into the output vocabulary
        inputs = task.vocabulary.apply([ref.model for ref in task.inputs], inputs)
    lines = task.lines_scale is not None  # LiNeS: merge in float32, rescale the task vector, round once
    out_dtype = accum_dtype(job.out_dtype) if lines else job.out_dtype
    if _is_plain_copy(job, inputs[0].dtype):
        out = inputs[0]
    elif task.bound is not None:  # parameters validated by the planner: not again per tensor
        out = merge_bound(inputs, get_method(task.method), task.bound, base_index=task.base_index,
                          name=task.out_name, dtype=task.dtype, out_dtype=out_dtype)
    else:
        out = merge_tensors(inputs, task.method, parameters=task.parameters, base_index=task.base_index,
                            name=task.out_name, dtype=task.dtype, out_dtype=out_dtype)
    if lines:
        out = scale_task_vector(inputs[task.base_index], out, task.lines_scale, job.out_dtype)
    if tuple(out.shape) != tuple(task.shape):
        raise ShapeMismatchError(f"output tensor {task.out_name!r}: the plan says shape {list(task.shape)}, "
                                 f"the merge produced {list(out.shape)}")
    return out.to(job.out_dtype)


class _Streamer:
    """Reads, merges and writes a list of jobs with a bounded number in flight (see the module docstring).

    ``transfer`` None: inputs are read into new CPU tensors and merged there. Otherwise every tensor is staged
    through two pinned input and two pinned output slots (:mod:`.transfer`) and merged on ``transfer.device``.
    """

    def __init__(self, ckpts: dict, writer: ShardedWriter, transfer: DeviceTransfer | None, max_in_flight: int,
                 progress):
        self.ckpts = ckpts
        self.writer = writer
        self.transfer = transfer
        self.depth = max(0, max_in_flight - 1)
        self.progress = progress
        self.inputs_pool = self.outputs_pool = None

    def _stage(self, jobs: list[_Job]) -> None:
        largest = max([j.write_bytes for j in jobs]
                      + [self.ckpts[r.model].info(r.name).nbytes for j in jobs for r in j.task.inputs], default=1)
        self.inputs_pool = SlotPool(self.transfer, 2, largest)
        self.outputs_pool = SlotPool(self.transfer, 2, largest)

    # -- reader thread
    def _read(self, job: _Job):
        if self.transfer is None:
            return [self.ckpts[ref.model].read(ref.name) for ref in job.task.inputs], None
        dev, event = [], None
        for ref in job.task.inputs:
            slot = self.inputs_pool.acquire()
            try:
                host = self.ckpts[ref.model].read(ref.name, slot.buffer)
                tensor, event = self.transfer.to_device(host)
            finally:
                self.inputs_pool.release(slot, event)
            dev.append(tensor)
        return dev, event  # one stream: the last copy's event covers the task

    # -- writer thread
    def _write(self, name: str, host: torch.Tensor, slot, event) -> None:
        try:
            if event is not None:
                self.transfer.synchronize(event)
            self.writer.add(name, host)
        finally:
            if slot is not None:
                self.outputs_pool.release(slot)

    # -- main thread
    def _to_host(self, job: _Job, out: torch.Tensor):
        if self.transfer is None:
            return out, None, None
        slot = self.outputs_pool.acquire()
        host = slot.view(job.write_bytes, out.dtype, out.shape)
        try:
            return host, slot, self.transfer.to_host(out, host)
        except BaseException:
            self.outputs_pool.release(slot)
            raise

    def run(self, jobs: list[_Job]) -> None:
        if self.transfer is not None:
            self._stage(jobs)
        with ThreadPoolExecutor(1, thread_name_prefix="fe-read") as readers, \
                ThreadPoolExecutor(1, thread_name_prefix="fe-write") as writers:
            pending_reads: collections.deque = collections.deque()
            pending_write = None
            next_read = 0
            try:
                for job in jobs:
                    while next_read < len(jobs) and len(pending_reads) <= self.depth:
                        pending_reads.append(readers.submit(self._read, jobs[next_read]))
                        next_read += 1
                    inputs, event = pending_reads.popleft().result()
                    if event is not None:
                        self.transfer.consume(event, inputs)
                    out = merge_job(job, inputs)
                    del inputs
                    host, slot, done = self._to_host(job, out)
                    del out
                    if pending_write is not None:
                        pending_write.result()
                        self.progress.update(1)
                    pending_write = writers.submit(self._write, job.task.out_name, host, slot, done)
                    del host
                if pending_write is not None:
                    pending_write.result()
                    self.progress.update(1)
            finally:
                for f in pending_reads:
                    f.cancel()


class _Progress:
    """tqdm over bytes written (rate in GB/s) with the tensor count; silent when quiet."""

    def __init__(self, jobs: list[_Job], quiet: bool, desc: str):
        self._jobs = iter(jobs)
        self._bar = None
        self._count = 0
        self._total = len(jobs)
        if not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=sum(j.write_bytes for j in jobs), unit="B", unit_scale=True, unit_divisor=1000,
                             desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        for _ in range(n):
            job = next(self._jobs)
            self._count += 1
            if self._bar is not None:
                self._bar.update(job.write_bytes)
                self._bar.set_postfix_str(f"{self._count}/{self._total} tensors", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_output_not_input(out_dir: str, plan: MergePlan) -> None:
    inputs = {f"the input model {key!r}" + (f" ({part})" if part != path else ""): part
              for key, path in plan.models.items() for part in split_reference(path)}  # BASE+ADAPTER: both
    inputs.update({f"the source of side file {name}": path for name, path in plan.extra_files.items()})
    inputs.update(plan.reads)
    check_output_not_input(out_dir, inputs)


def write_side_files(plan: MergePlan, ckpts: dict, out_dir: str) -> list[str]:
    """config.json (from the plan, else the reference model's), tokenizer/generation files and the plan's
    generated files (the model card)."""
    written = []
    reference = _reference_model(plan)
    ref_dir = ckpts[reference].directory if reference in ckpts else None
    if plan.config_json is not None:
        write_file_synced(os.path.join(out_dir, "config.json"),
                          (json.dumps(plan.config_json, indent=2, sort_keys=True) + "\n").encode())
        written.append("config.json")
    sources = dict(plan.extra_files)
    if not sources and ref_dir is not None:  # a plan naming no side files: the reference model's
        names = SIDE_FILES if plan.config_json is not None else ("config.json",) + SIDE_FILES
        sources = {n: os.path.join(ref_dir, n) for n in names if os.path.isfile(os.path.join(ref_dir, n))}
    for out_name, src in sources.items():
        if os.path.isabs(out_name) or os.path.normpath(out_name).startswith(".."):
            raise CheckpointError(f"side file name {out_name!r} must be a path inside the output folder")
        if not os.path.lexists(src):
            raise CheckpointError(f"side file {src} (for {out_name}) does not exist")
        dest = os.path.join(out_dir, out_name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            with open_input(src) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
        except OSError as exc:
            raise CheckpointError(f"side file {src} (for {out_name}): cannot copy ({exc.strerror or exc})") from None
        written.append(out_name)
    for out_name, content in plan.generated_files.items():
        write_file_synced(os.path.join(out_dir, out_name), content)
        written.append(out_name)
    return written


def prepare(plan: MergePlan, out_shard_size, ckpts: Checkpoints) -> tuple[list[_Job], ShardLayout]:
    """Open the inputs not yet in ``ckpts``, resolve every task's dtype and fix the output layout
    (no tensor data is read)."""
    for key, path in plan.models.items():
        open_model_into(ckpts, key, path)
    jobs = resolve_jobs(plan, ckpts)
    layout = plan_shards([(j.task.out_name, j.out_dtype, tuple(j.task.shape)) for j in jobs],
                         parse_size(out_shard_size))
    order = {name: i for i, name in enumerate(layout.slots)}
    jobs.sort(key=lambda j: order[j.task.out_name])  # write order: shard by shard, offset by offset
    return jobs, layout


def stream_jobs(jobs, ckpts, writer, device, max_in_flight, quiet, desc="merging") -> None:
    progress = _Progress(jobs, quiet, desc)
    try:
        _Streamer(ckpts, writer, transfer_for(torch.device(device)), max_in_flight, progress).run(jobs)
    finally:
        progress.close()


def run_plan(plan: MergePlan, out_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
             out_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, allow_overwrite: bool = False,
             quiet: bool = False, max_in_flight: int = 2, checkpoints: Checkpoints | None = None) -> dict:
    """Execute ``plan`` and write the merged checkpoint to ``out_dir`` (atomically).

    Parameters
    ----------
    device : where tensors are merged ("cpu", "cuda", "cuda:1"); inputs are read on the host either way.
    out_shard_size : the largest shard's data size, bytes or a string like ``"5GB"`` (HF's default).
    allow_overwrite : replace an existing ``out_dir`` (otherwise that is a CheckpointError).
    quiet : no progress bar.
    max_in_flight : tasks whose inputs are held at once (1 = no read-ahead; memory grows with it).
    checkpoints : the inputs :func:`~fusion_engine.checkpoint.planner.build_plan` opened (left open;
        the caller closes them); None opens the plan's models here.

    Returns a summary dict: ``out_dir``, ``tensors``, ``bytes_read``, ``bytes_written``, ``seconds``,
    ``files``, ``world_size``, ``device``.

    Under ``torchrun`` (environment ``WORLD_SIZE > 1``) the ranks split the work (see
    :mod:`fusion_engine.checkpoint.distributed`); every rank returns the same summary.
    """
    if max_in_flight < 1:
        raise CheckpointError(f"max_in_flight must be >= 1, got {max_in_flight}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_output_not_input(out_dir, plan)
    if distributed.world_size_from_env() > 1:
        return _run_plan_ranks(plan, out_dir, device=device, out_shard_size=out_shard_size,
                               allow_overwrite=allow_overwrite, quiet=quiet, max_in_flight=max_in_flight,
                               checkpoints=checkpoints)
    device = torch.device(device)
    start = time.perf_counter()
    with Checkpoints.borrow(checkpoints) as ckpts:
        jobs, layout = prepare(plan, out_shard_size, ckpts)
        sources = ckpts
        if plan.alignment:  # every model permuted onto the reference as it is read
            from ..alignment.checkpoints import align_checkpoints
            sources = align_checkpoints(plan.alignment, _reference_model(plan), ckpts, data=plan.alignment_data)
        with atomic_output_dir(out_dir, allow_overwrite) as tmp:
            with ShardedWriter(tmp, layout) as writer:
                stream_jobs(jobs, sources, writer, device, max_in_flight, quiet)
                files = writer.finish()
            files += write_side_files(plan, ckpts, tmp)
    return {"out_dir": out_dir, "tensors": len(jobs), "bytes_read": sum(j.read_bytes for j in jobs),
            "bytes_written": layout.total_bytes, "seconds": time.perf_counter() - start, "files": files,
            "world_size": 1, "device": str(device)}


def _run_plan_ranks(plan, out_dir: str, *, device="cpu", out_shard_size=DEFAULT_MAX_SHARD_BYTES,
                    allow_overwrite: bool = False, quiet: bool = False, max_in_flight: int = 2,
                    checkpoints: Checkpoints | None = None) -> dict:
    """:func:`run_plan` for one rank of a torch.distributed job (see :mod:`.distributed`)."""
    import torch.distributed as dist

    created, device = distributed.init_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    ckpts = Checkpoints() if checkpoints is None else checkpoints
    try:
        # every rank opens the inputs and plans; a failure anywhere stops all ranks before any output exists
        error = None
        try:
            jobs, layout = prepare(plan, out_shard_size, ckpts)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
        distributed.raise_if_any(error, rank, world, "planning")

        sources = ckpts
        if plan.alignment:  # rank 0 finds the permutations, every rank reads through them
            from ..alignment.checkpoints import alignment_permutations, permuted_checkpoints
            perms, error, reference = None, None, _reference_model(plan)
            if rank == 0:
                try:
                    perms = alignment_permutations(plan.alignment, reference, ckpts, data=plan.alignment_data)
                except Exception as exc:  # noqa: BLE001 - reported to every rank below
                    error = exc
            distributed.raise_if_any(error, rank, world, "aligning the models")  # before any output exists
            sources = permuted_checkpoints(ckpts, reference, distributed.broadcast(perms))

        tmp, error = None, None
        if rank == 0:
            try:
                tmp = make_temp_dir(out_dir, allow_overwrite)
                ShardedWriter(tmp, layout).close()  # headers and sizes; data comes from every rank
            except Exception as exc:  # noqa: BLE001
                error = exc
                if tmp is not None:
                    discard_temp_dir(tmp)
        tmp = distributed.broadcast(tmp)
        distributed.raise_if_any(error, rank, world, "creating the output")

        share = distributed.split_by_bytes([j.read_bytes + j.write_bytes for j in jobs], world)[rank]
        mine = jobs[share.start:share.stop]
        error = None
        try:
            with ShardedWriter(tmp, layout, create=False) as writer:
                stream_jobs(mine, sources, writer, device, max_in_flight, quiet or rank != 0,
                            desc=f"merging (rank 0 of {world})")
                writer.finish(expected=[j.task.out_name for j in mine], write_index=False)
        except Exception as exc:  # noqa: BLE001
            error = exc
        try:
            distributed.raise_if_any(error, rank, world, "merging")
        except BaseException:
            if rank == 0:
                discard_temp_dir(tmp)
            raise

        files, error = list(layout.filenames), None
        if rank == 0:
            try:
                if len(layout.filenames) > 1:
                    write_file_synced(os.path.join(tmp, SAFETENSORS_INDEX), layout.index_json().encode())
                    files.append(SAFETENSORS_INDEX)
                files += write_side_files(plan, ckpts, tmp)
                commit_temp_dir(tmp, out_dir, allow_overwrite)
            except Exception as exc:  # noqa: BLE001
                error = exc
                discard_temp_dir(tmp)
        files = distributed.broadcast(files)
        distributed.raise_if_any(error, rank, world, "finishing the output")
    finally:
        if checkpoints is None:
            ckpts.close()
        if created:
            dist.destroy_process_group()
    return {"out_dir": out_dir, "tensors": len(jobs), "bytes_read": sum(j.read_bytes for j in jobs),
            "bytes_written": layout.total_bytes, "seconds": time.perf_counter() - start, "files": files,
            "world_size": world, "device": str(device), "rank": rank, "rank_tensors": len(mine)}
