"""Progress for every long command: a tqdm bar on a terminal, plain log lines everywhere else.

Under nohup, a cluster scheduler or a CI log tqdm shows nothing (``disable=None`` turns it off without a TTY),
so a 10-minute ``generate`` would be silent. ``Progress`` then prints one line to stderr at each tenth of the
work (and at the end): ``generate: 120/443 rows (27%) 2.1 rows/s ETA 2m34s``. The lines are tied to the amount
of work done, not to the clock, so what a run prints does not depend on the machine's speed.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """``with Progress(total, "generate", "row") as p: ... p.update(n)``; ``initial`` counts work a resume skips."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True, lines: int = 10):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True)
        self.plain = enabled and getattr(self.bar, "disable", True)
        self.start, self.t0 = initial, time.perf_counter()
        self.marks = [initial + (total - initial) * k // lines for k in range(1, lines + 1)] if total > initial else []

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if self.plain and self.marks and self.done >= self.marks[0]:
            while self.marks and self.done >= self.marks[0]:
                self.marks.pop(0)
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        rate = (self.done - self.start) / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100 * self.done // max(1, self.total)
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct}%) {rate:.3g} {self.unit}s/s "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items, desc: str, unit: str, total: int | None = None, enabled: bool = True):
    """Iterate ``items`` with a ``Progress`` (the plain-line fallback of ``tqdm(items)``)."""
    total = len(items) if total is None else total
    with Progress(total, desc, unit, enabled=enabled) as p:
        for x in items:
            yield x
            p.update(1)
