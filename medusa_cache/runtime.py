"""What a training process sets up around its loop: the allocator and the stop signals."""

from __future__ import annotations

import sys

import torch


def tune_allocator() -> None:
    """glibc: serve large tensors from the heap instead of a fresh mmap each time.

    A training step allocates and frees the same multi-MB tensors (logits, gradients) every step; above glibc's
    mmap threshold each one is a new mapping and its pages fault in again on every step. Measured on stories260K-
    sized heads (tools/bench_train.py (d)): ~50K tokens/s with the default, ~84K with the threshold raised, above a
    bare PyTorch loop that had raised it implicitly. The heap is also not trimmed back each step. No-op elsewhere.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 512 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass



class StopSignals:
    """SIGINT/SIGTERM set a flag instead of killing the run; the loop checks it after each optimizer step.

    Under torchrun every rank must stop at the same step, so the flag is agreed with an all-reduce (MAX).
    """

    def __init__(self) -> None:
        import signal
        import threading

        self.signum: int | None = None
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        from . import dist

        if dist.active():
            t = torch.tensor([self.signum or 0])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(t.item()) or None
        return self.signum is not None

    def restore(self) -> None:
        import signal

        for sig, h in self.previous.items():
            signal.signal(sig, h)
        self.previous = {}
