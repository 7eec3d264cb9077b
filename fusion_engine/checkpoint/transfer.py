"""Host <-> device staging for the executor: pinned double buffers, a copy stream each way, events.

The executor (:mod:`fusion_engine.checkpoint.executor`) moves every tensor through::

    reader thread:  pread into a pinned input slot -> H2D on the copy-in stream -> event (slot reusable after it)
    main thread:    compute stream waits the task's H2D event -> merge kernels
    main thread:    copy-out stream waits the compute stream -> D2H into a pinned output slot -> event
    writer thread:  waits that event -> pwrite from the slot -> slot free again

Everything device-specific sits behind :class:`DeviceTransfer` (five calls: ``pinned``, ``to_device``,
``consume``, ``to_host``, ``synchronize``), so the ordering logic of :class:`SlotPool` and the executor is the
same for CUDA (:class:`CudaTransfer`) and for the asynchronous fake the tests use
(``tests/io/fake_device.py``: a thread per stream, delays, garbage before a copy lands — a missing wait
changes the merged bytes).

Host memory is bounded: ``2 × T`` pinned input bytes and ``2 × T`` pinned output bytes, ``T`` the largest
tensor (input or output) in bytes, whatever ``max_in_flight`` is (the read-ahead then only costs device
memory). A 1.1 B Llama (32000 × 2048 bf16 embeddings, T = 131 MB) stages in 524 MB of pinned memory;
peak RSS ≈ ``4 T`` + the CUDA context and torch (≈ 0.5–0.8 GB) + the plan.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import torch

SLOT_ALIGN = 64  # bytes: any dtype view of a slot is aligned


@dataclass
class Slot:
    """One pinned host buffer and the event after which its last copy is done (None: free now)."""

    buffer: torch.Tensor
    event: object = None

    def view(self, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return self.buffer[:nbytes].view(dtype).view(shape)


class DeviceTransfer:
    """What the executor needs of a device: pinned buffers, async copies on their own streams, events.

    ``to_device`` / ``to_host`` only *enqueue*; the returned event completes when the copy has landed.
    ``consume`` orders the compute stream after an event and keeps the tensors alive for it; ``synchronize``
    blocks the calling host thread until an event completes.
    """

    device: torch.device

    def pinned(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def to_device(self, host: torch.Tensor):
        """Enqueue ``host -> device`` on the copy-in stream; returns ``(device tensor, event)``."""
        raise NotImplementedError

    def consume(self, event, tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def to_host(self, out: torch.Tensor, host: torch.Tensor):
        """Enqueue ``out -> host`` on the copy-out stream after the compute stream's work; returns the event."""
        raise NotImplementedError

    def synchronize(self, event) -> None:
        raise NotImplementedError


class CudaTransfer(DeviceTransfer):
    """:class:`DeviceTransfer` on one CUDA device: a copy-in and a copy-out stream beside the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_in = torch.cuda.Stream(device)
        self.copy_out = torch.cuda.Stream(device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_device(self, host: torch.Tensor):
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_in):
            dev = host.to(self.device, non_blocking=True)  # allocated on copy_in: consume() records compute
            event = torch.cuda.Event()
            event.record(self.copy_in)
        return dev, event

    def consume(self, event, tensors: list[torch.Tensor]) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors:
            t.record_stream(compute)  # the caching allocator must not hand the memory to copy_in too early

    def to_host(self, out: torch.Tensor, host: torch.Tensor):
        self.copy_out.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_out):
            host.copy_(out, non_blocking=True)
            out.record_stream(self.copy_out)
            event = torch.cuda.Event()
            event.record(self.copy_out)
        return event

    def synchronize(self, event) -> None:
        event.synchronize()


def transfer_for(device: torch.device) -> DeviceTransfer | None:
    """The staging for ``device``; None on the CPU (inputs are read straight into the tensors merged)."""
    return CudaTransfer(device) if device.type == "cuda" else None


class SlotPool:
    """``count`` pinned slots of ``nbytes`` each, handed out one at a time, reused only after their event.

    ``acquire`` blocks until a slot is returned, then waits (host side) for the slot's last copy to finish,
    so a buffer is never overwritten while a copy still reads it or read while a copy still writes it.
    """

    def __init__(self, transfer: DeviceTransfer, count: int, nbytes: int):
        self.transfer = transfer
        self._free: queue.Queue[Slot] = queue.Queue()
        size = -(-max(nbytes, 1) // SLOT_ALIGN) * SLOT_ALIGN
        for _ in range(count):
            self._free.put(Slot(transfer.pinned(size)))

    def acquire(self) -> Slot:
        slot = self._free.get()
        if slot.event is not None:
            self.transfer.synchronize(slot.event)
            slot.event = None
        return slot

    def release(self, slot: Slot, event=None) -> None:
        slot.event = event
        self._free.put(slot)
