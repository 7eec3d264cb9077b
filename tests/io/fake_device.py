"""An asynchronous fake of :class:`~fusion_engine.checkpoint.transfer.DeviceTransfer` for CPU tests.

Each copy stream is a worker thread running its copies in order after a short delay; an event is a
``threading.Event`` set when the copy has landed. Until then the destination holds garbage (finite
bytes, so the merge runs on and writes them), and a host->device copy reads its pinned source only when it runs, as a DMA engine would. So a
merge that does not wait for its inputs, a write that does not wait for its output, or a pinned slot refilled
before its copy ran all change the bytes written: the tests compare them with the plain CPU merge.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fusion_engine.checkpoint.transfer import DeviceTransfer

GARBAGE = 0x3C  # a finite value in every float dtype (bf16 0x3C3C ≈ 0.0115): wrong bytes, not NaN


class FakeEvent:
    def __init__(self):
        self.done = threading.Event()


class FakeTransfer(DeviceTransfer):
    """Fake device on the host: copies land ``delay`` seconds after they reach the head of their stream."""

    def __init__(self, delay: float = 0.002):
        self.device = torch.device("cpu")
        self.delay = delay
        self.copy_in = ThreadPoolExecutor(1, thread_name_prefix="fake-h2d")
        self.copy_out = ThreadPoolExecutor(1, thread_name_prefix="fake-d2h")
        self.pinned_bytes = 0
        self.consumed = 0

    def _enqueue(self, stream, copy) -> FakeEvent:
        event = FakeEvent()

        def run():
            time.sleep(self.delay)
            copy()
            event.done.set()

        stream.submit(run)
        return event

    def pinned(self, nbytes: int) -> torch.Tensor:
        self.pinned_bytes += nbytes
        return torch.full((nbytes,), GARBAGE, dtype=torch.uint8)

    def to_device(self, host: torch.Tensor):
        dev = torch.empty_like(host)
        dev.view(-1).view(torch.uint8).fill_(GARBAGE)
        return dev, self._enqueue(self.copy_in, lambda: dev.copy_(host))

    def consume(self, event, tensors) -> None:
        event.done.wait()  # the compute "stream" is the calling thread
        self.consumed += 1

    def to_host(self, out: torch.Tensor, host: torch.Tensor):
        host.view(-1).view(torch.uint8).fill_(GARBAGE)  # stale slot contents until the copy lands
        return self._enqueue(self.copy_out, lambda: host.copy_(out))

    def synchronize(self, event) -> None:
        event.done.wait()

    def close(self) -> None:
        self.copy_in.shutdown()
        self.copy_out.shutdown()
