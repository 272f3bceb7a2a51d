"""Batches of (hidden states, per-head targets) streamed from the cache: the epoch's plan comes from ``loader``.

Three row sources, one per read mode, each yielding (batch index, rows, their targets, rows with lookahead) for
batches of pieces in order: ``MemoryRows`` (``--in-memory``: slices), ``DirectRows`` (local stores holding every
row: each batch's pieces decoded straight into one buffer) and ``BlockRows`` (anything else: each block read once
when its first sequence is needed, only sequences still to come kept). ``BatchStream`` turns rows into ``Batch``es
(gathering mixed positions from whole windows for a ``PositionPlan``), takes this rank's share of the epoch, and
runs ahead of the trainer in a ``Prefetch`` thread when it streams from the store.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .loader import Piece, PositionPlan, all_targets, targets_for
from .store import Cache

Rows = Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass
class Batch:
    hidden: torch.Tensor  # [T, H] stored dtype
    targets: torch.Tensor  # [T, K] int64
    index: int  # batch index within the epoch
    ahead: torch.Tensor | None = None  # [T', H] rows of each piece plus up to `lookahead` rows after it
    ahead_idx: torch.Tensor | None = None  # [T, K] row of `ahead` holding position t+1+i, -1 past the sequence


@dataclass
class StreamSource:
    """Where a stream's rows come from and what each batch carries: the store (read block by block, or decoded
    straight into each batch's buffer when ``Cache.reads_into``) or every row held in ``memory``."""

    cache: Cache
    labels: np.ndarray
    num_heads: int
    blocks: list[np.ndarray]
    """The epoch's read blocks (``make_blocks``): a block is read once, its sequences kept until last used."""
    memory: torch.Tensor | None = None
    """Every row in memory (``--in-memory``): batches slice it, no reader thread."""
    targets: torch.Tensor | None = None
    """With ``memory``: every row's targets, computed once here (vectorised) unless given (reused across epochs)."""
    packed: bool = False
    """int8 stores hand over ``int8_pack`` rows; the consumer decodes them (on its device)."""
    lookahead: int = 0
    """Rows after each piece also handed over (``--distill``: the base model's next-token rows)."""

    def __post_init__(self) -> None:
        if self.memory is not None and self.targets is None:
            self.targets = torch.from_numpy(all_targets(self.labels, self.cache.offsets, self.num_heads))

    def rows(self, batches: list[list[Piece]], start: int, look: int) -> Rows:
        """Batches ``start``.. of ``batches`` by the read mode this source allows (each piece extended by ``look``
        rows of its own sequence)."""
        if self.memory is not None:
            return memory_rows(self, batches, start, look)
        if self.cache.reads_into():
            return direct_rows(self, batches, start, look)
        return block_rows(self, batches, start, look)


def memory_rows(src: StreamSource, batches: list[list[Piece]], start: int, look: int) -> Rows:
    """Slices of the rows held in memory, and of their precomputed targets."""
    offsets = src.cache.offsets
    for bi in range(start, len(batches)):
        parts, targets, ahead = [], [], []
        for s, a, b in batches[bi]:
            parts.append(src.memory[a:b])
            targets.append(src.targets[a:b])
            ahead.append(src.memory[a:min(b + look, int(offsets[s + 1]))])
        yield bi, _cat(parts), _cat(targets), (torch.cat(ahead) if look else None)


def block_rows(src: StreamSource, batches: list[list[Piece]], start: int, look: int) -> Rows:
    """Each block read once (``read_hidden``) when its first sequence is needed; its targets computed then,
    vectorised over the block; only the sequences still to come are kept."""
    offsets = src.cache.offsets
    block_of = {int(s): b for b, seqs in enumerate(src.blocks) for s in seqs}
    last_use: dict[int, int] = {}  # sequence -> last batch index that needs it
    for bi in range(start, len(batches)):
        for s, _, _ in batches[bi]:
            last_use[s] = bi
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for bi in range(start, len(batches)):
        parts, targets, ahead = [], [], []
        for s, a, b in batches[bi]:
            if s not in held:  # first use: read its whole block, keep the sequences still to come
                seqs = src.blocks[block_of[s]]
                lo, hi = int(offsets[seqs[0]]), int(offsets[seqs[-1] + 1])
                rows = src.cache.read_hidden(lo, hi, src.packed)
                tg = torch.from_numpy(all_targets(src.labels[lo:hi], offsets[seqs[0]: seqs[-1] + 2] - lo,
                                                  src.num_heads))
                for t in (int(t) for t in seqs):
                    if last_use.get(t, -1) >= bi and t not in held:
                        r = slice(int(offsets[t]) - lo, int(offsets[t + 1]) - lo)
                        held[t] = (rows[r].clone(), tg[r])
            s0, b_ext = int(offsets[s]), min(b + look, int(offsets[s + 1]))
            parts.append(held[s][0][a - s0 : b - s0])
            targets.append(held[s][1][a - s0 : b - s0])
            ahead.append(held[s][0][a - s0 : b_ext - s0])
            if last_use[s] == bi:
                del held[s]
        yield bi, _cat(parts), _cat(targets), (torch.cat(ahead) if look else None)


def direct_rows(src: StreamSource, batches: list[list[Piece]], start: int, look: int) -> Rows:
    """Each batch's pieces decoded straight into one buffer (no block held, no per-sequence copy, no
    concatenation); memory is the prefetched batches alone. Same values, same order as ``block_rows``."""
    offsets, cache = src.cache.offsets, src.cache
    width, dtype = cache.reads.width(src.packed)
    for bi in range(start, len(batches)):
        pieces = batches[bi]
        # with lookahead each piece is read once, extended; the piece rows are then gathered from it
        spans = [(a, min(b + look, int(offsets[s + 1])) if look else b) for s, a, b in pieces]
        buf = torch.empty((sum(b - a for a, b in spans), width), dtype=dtype)
        o, own = 0, []
        for (a, b), (_, _, piece_end) in zip(spans, pieces, strict=True):
            cache.reads.into(a, b, buf[o : o + b - a], src.packed)
            own.append(np.arange(o, o + piece_end - a))
            o += b - a
        tg = np.concatenate([targets_for(src.labels, offsets, piece, src.num_heads) for piece in pieces])
        hidden = buf[torch.from_numpy(np.concatenate(own))] if look else buf
        yield bi, hidden, torch.from_numpy(tg), (buf if look else None)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Prefetch:
    """Runs an iterator in a daemon thread, up to ``size`` items ahead; its exceptions re-raised in the consumer.
    ``close`` stops it wherever it is (an abandoned epoch)."""

    def __init__(self, items: Iterable, size: int):
        self.items, self.q, self.stop = items, queue.Queue(maxsize=max(1, size)), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self.q.put(e)

    def __iter__(self) -> Iterator:
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass


class BatchStream:
    """This process's batches of an epoch, from its local batch ``start`` on.

    ``batches`` is the whole epoch's: a list of batches of pieces, or a ``PositionPlan`` (``--mix positions``: whole
    windows are read, positions mixed after). Either way rank r of ``world`` takes batches r, r+W, ...: the one
    place that spreads an epoch over processes. Streaming from the store runs in a ``Prefetch`` thread (``prefetch``
    batches ahead); rows in memory need none (a thread would only contend for the GIL)."""

    def __init__(self, source: StreamSource, batches: list[list[Piece]] | PositionPlan, start: int = 0,
                 prefetch: int = 4, rank: int = 0, world: int = 1):
        self.src, self.first, self.rank, self.world = source, start, rank, world
        self.plan = batches if isinstance(batches, PositionPlan) else None
        self.batches = batches.windows if self.plan is not None else batches[rank::world]
        self.prefetch = Prefetch(self._items(), prefetch) if source.memory is None else None

    def _items(self) -> Iterator[Batch]:
        if self.plan is not None:
            yield from self._position_items()
            return
        for bi, hidden, tg, ahead in self.src.rows(self.batches, self.first, self.src.lookahead):
            item = Batch(hidden, tg, bi)
            if ahead is not None:
                item.ahead, item.ahead_idx = ahead, torch.from_numpy(self._ahead_idx(self.batches[bi]))
            yield item

    def _ahead_idx(self, pieces: list[Piece]) -> np.ndarray:
        offsets, out, base, k = self.src.cache.offsets, [], 0, self.src.num_heads
        for s, a, b in pieces:
            end = int(offsets[s + 1])
            p = np.arange(b - a)[:, None] + 1 + np.arange(k)[None, :]  # local row of t+1+i
            out.append(np.where(a + p < end, base + p, -1))
            base += min(b + self.src.lookahead, end) - a
        return np.concatenate(out)

    def _position_items(self) -> Iterator[Batch]:
        """The plan's batches: positions gathered from at most two windows held at a time."""
        plan, held = self.plan, {}
        g0 = self.first * self.world + self.rank  # read whole windows, from the one holding the first position
        start = int(plan.window[g0 * plan.batch]) if g0 < len(plan) else len(plan.windows)
        windows = self.src.rows(plan.windows, start, 0)  # windows are whole sequences: nothing lies after them
        for j, gi in enumerate(range(g0, len(plan), self.world), self.first):
            cut = slice(gi * plan.batch, (gi + 1) * plan.batch)
            w, loc = plan.window[cut], plan.local[cut]
            while int(w[-1]) not in held:
                wi, hw, tw, _ = next(windows)
                lens = [b - a for _, a, b in plan.windows[wi]]
                held[wi] = (hw, tw, np.repeat(np.cumsum(lens), lens))  # + end of each row's sequence in the window
            for old in [x for x in held if x < int(w[0])]:
                del held[old]
            parts = [(int(wi), loc[w == wi]) for wi in np.unique(w)]
            item = Batch(torch.cat([held[wi][0][torch.from_numpy(sel)] for wi, sel in parts]),
                         torch.cat([held[wi][1][torch.from_numpy(sel)] for wi, sel in parts]), j)
            if self.src.lookahead:
                item.ahead, item.ahead_idx = self._gather_ahead(parts, held)
            yield item

    def _gather_ahead(self, parts: list[tuple[int, np.ndarray]], held: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows t+1+i of each position (same sequence), gathered once each."""
        aheads, idx, base, k = [], [], 0, self.src.num_heads
        for wi, sel in parts:
            rows = sel[:, None] + 1 + np.arange(k)[None, :]
            ok = rows < held[wi][2][sel][:, None]
            uniq, inv = np.unique(rows[ok], return_inverse=True)
            ix = np.full(rows.shape, -1, dtype=np.int64)
            ix[ok] = inv + base
            aheads.append(held[wi][0][torch.from_numpy(uniq)])
            idx.append(ix)
            base += len(uniq)
        return torch.cat(aheads), torch.from_numpy(np.concatenate(idx))

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.prefetch) if self.prefetch is not None else self._items()

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
