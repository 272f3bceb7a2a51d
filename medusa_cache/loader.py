"""Batches of (hidden states, per-head targets) streamed from the cache.

Order. An epoch's order is a pure function of (seed, epoch): the training sequences are grouped into
*blocks* of consecutive sequences (~``block_tokens`` each, so one block is one contiguous Zarr read),
blocks are permuted, and their sequences pass through a shuffle buffer of ``shuffle_buffer`` sequences.
Because the order needs no data, a resumed run recomputes it and starts at the saved batch index.

Targets. Head i at position p is trained on ``labels[p + 2 + i]`` when that token lies in the same
sequence, else ``IGNORE``; ``labels`` already holds ``IGNORE`` for non-assistant and out-of-draft-vocab
tokens. So a piece of a sequence carries its own targets, and token batches (``--batch-tokens``) can be
cut anywhere.

Position mixing (``mix="positions"``, token mode). Heads are position-wise, so a batch need not be made of
contiguous pieces, whose neighbouring positions are highly correlated. The epoch's sequence order (above) is cut
into *windows* of whole sequences of ~``window_tokens`` tokens; each window's *trainable* positions (at least one
head target) are permuted (seed, epoch, window) and the permuted windows, concatenated, are cut into batches of
``batch_tokens`` positions. Memory: at most two windows. Like the order, the plan is a pure function of (seed,
epoch) and the labels, so a resumed run starts at the saved batch index.

Reading. A background thread walks the batches ahead of the trainer (``prefetch`` batches), loads each
block once when its first sequence is needed, and keeps only sequences still to come; memory is bounded
by the shuffle buffer plus one block, whatever the cache size. ``in_memory`` reads the store once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .store import Cache, any_in_window
from .vocab import IGNORE

Piece = tuple[int, int, int]  # (sequence index, start row, stop row) in token coordinates


def make_blocks(seqs: np.ndarray, offsets: np.ndarray, block_tokens: int) -> list[np.ndarray]:
    blocks, cur, cur_tokens = [], [], 0
    for s in np.sort(seqs):
        cur.append(s)
        cur_tokens += int(offsets[s + 1] - offsets[s])
        if cur_tokens >= block_tokens:
            blocks.append(np.array(cur))
            cur, cur_tokens = [], 0
    if cur:
        blocks.append(np.array(cur))
    return blocks


def epoch_order(blocks: list[np.ndarray], seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    order, buf = [], []
    for b in rng.permutation(len(blocks)):
        for s in blocks[b]:
            if len(buf) < shuffle_buffer:
                buf.append(int(s))
                continue
            j = int(rng.integers(len(buf)))
            order.append(buf[j])
            buf[j] = int(s)
    order.extend(buf[j] for j in rng.permutation(len(buf)))
    return np.array(order, dtype=np.int64)


def make_batches(order: np.ndarray, offsets: np.ndarray, batch_size: int,
                 batch_tokens: int | None) -> list[list[Piece]]:
    """Sequence mode: ``batch_size`` whole sequences per batch. Token mode: pieces filling ``batch_tokens``."""
    if not batch_tokens:
        return [[(int(s), int(offsets[s]), int(offsets[s + 1])) for s in order[i : i + batch_size]]
                for i in range(0, len(order), batch_size)]
    batches, cur, room = [], [], batch_tokens
    for s in order:
        a, b = int(offsets[s]), int(offsets[s + 1])
        while a < b:
            take = min(room, b - a)
            cur.append((int(s), a, a + take))
            a += take
            room -= take
            if room == 0:
                batches.append(cur)
                cur, room = [], batch_tokens
    if cur:
        batches.append(cur)
    return batches


def targets_for(labels: np.ndarray, offsets: np.ndarray, piece: Piece, num_heads: int, shift: int = 2) -> np.ndarray:
    """[rows, num_heads]: column i holds ``labels[p + shift + i]`` inside the sequence, else IGNORE."""
    s, a, b = piece
    end = int(offsets[s + 1])
    out = np.full((b - a, num_heads), IGNORE, dtype=np.int64)
    for i in range(num_heads):
        lo, hi = a + shift + i, min(b + shift + i, end)
        if hi > lo:
            out[: hi - lo, i] = labels[lo:hi]
    return out


def all_targets(labels: np.ndarray, offsets: np.ndarray, num_heads: int, shift: int = 2) -> np.ndarray:
    """[N, num_heads] targets of every row at once (what ``targets_for`` gives piece by piece), vectorised."""
    n = len(labels)
    rows = np.arange(n)
    end = offsets[np.searchsorted(offsets, rows, side="right")]  # end of each row's sequence
    out = np.full((n, num_heads), IGNORE, dtype=np.int64)
    for i in range(num_heads):
        src = rows + shift + i
        ok = src < end
        out[ok, i] = labels[src[ok]]
    return out


def trainable_rows(labels: np.ndarray, offsets: np.ndarray, num_heads: int, shift: int = 2) -> np.ndarray:
    """bool [N]: row t has at least one head target (``labels[t+shift .. t+shift+K-1]`` inside its sequence)."""
    return any_in_window(labels != IGNORE, offsets, shift, shift + num_heads)


@dataclass
class PositionPlan:
    """One epoch of position-mixed batches: batch g = positions [g*batch, (g+1)*batch) of the permuted windows."""

    windows: list[list[Piece]]  # whole sequences, in the epoch's order
    window: np.ndarray  # [P] window of each position, in batch order
    local: np.ndarray  # [P] row of that position inside its window's concatenated rows
    batch: int

    def __len__(self) -> int:
        return -(-len(self.window) // self.batch)


def make_position_plan(order: np.ndarray, offsets: np.ndarray, trainable: np.ndarray, window_tokens: int,
                       batch: int, seed: int, epoch: int) -> PositionPlan:
    windows, cur, n = [], [], 0
    for s in order:
        a, b = int(offsets[s]), int(offsets[s + 1])
        cur.append((int(s), a, b))
        n += b - a
        if n >= window_tokens:
            windows.append(cur)
            cur, n = [], 0
    if cur:
        windows.append(cur)
    win, loc = [], []
    for w, pieces in enumerate(windows):
        base = np.concatenate([[0], np.cumsum([b - a for _, a, b in pieces])])
        local = np.concatenate([np.flatnonzero(trainable[a:b]) + base[j] for j, (_, a, b) in enumerate(pieces)])
        perm = np.random.default_rng([seed, epoch, w, 7]).permutation(len(local))
        win.append(np.full(len(local), w, dtype=np.int64))
        loc.append(local[perm])
    return PositionPlan(windows, np.concatenate(win), np.concatenate(loc), batch)


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


class BatchStream:
    """This process's batches of an epoch, from its local batch ``start`` on, read ahead by a thread.

    ``batches`` is the whole epoch's: a list of batches of pieces, or a ``PositionPlan`` (``--mix positions``: whole
    windows are read, positions mixed after). Either way rank r of ``world`` takes batches r, r+W, ...: the one
    place that spreads an epoch over processes."""

    def __init__(self, source: StreamSource, batches: list[list[Piece]] | PositionPlan, start: int = 0,
                 prefetch: int = 4, rank: int = 0, world: int = 1):
        self.cache, self.labels, self.k, self.blocks = source.cache, source.labels, source.num_heads, source.blocks
        self.memory, self.targets, self.packed, self.lookahead = source.memory, source.targets, source.packed, \
            source.lookahead
        self.first, self.rank, self.world = start, rank, world
        if isinstance(batches, PositionPlan):  # read whole windows, from the one holding the first position
            self.plan, g0 = batches, start * world + rank
            self.batches = batches.windows
            self.start = int(batches.window[g0 * batches.batch]) if g0 < len(batches) else len(batches.windows)
        else:
            self.plan, self.batches, self.start = None, batches[rank::world], start
        self.q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if self.memory is None:  # streaming: a reader thread overlaps Zarr reads and decoding with training
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _rows(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield (batch index, hidden rows, their targets, rows incl. lookahead) in order, reading each block once.

        A block's targets are computed when the block is read, vectorised over the block (``all_targets``)."""
        offsets = self.cache.offsets
        block_of = {int(s): b for b, seqs in enumerate(self.blocks) for s in seqs}
        last_use: dict[int, int] = {}  # sequence -> last batch index that needs it
        for bi in range(self.start, len(self.batches)):
            for s, _, _ in self.batches[bi]:
                last_use[s] = bi
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        look = self.lookahead if self.plan is None else 0  # windows are whole sequences: nothing lies after them
        if self.memory is None and self.cache.reads_into():
            yield from self._direct_rows(look)
            return
        for bi in range(self.start, len(self.batches)):
            parts, targets, ahead = [], [], []
            for s, a, b in self.batches[bi]:
                b_ext = min(b + look, int(offsets[s + 1]))
                if self.memory is not None:
                    parts.append(self.memory[a:b])
                    targets.append(self.targets[a:b])
                    ahead.append(self.memory[a:b_ext])
                    continue
                if s not in held:  # first use: read its whole block, keep the sequences still to come
                    seqs = self.blocks[block_of[s]]
                    lo, hi = int(offsets[seqs[0]]), int(offsets[seqs[-1] + 1])
                    rows = self.cache.read_hidden(lo, hi, self.packed)
                    tg = torch.from_numpy(all_targets(self.labels[lo:hi], offsets[seqs[0]: seqs[-1] + 2] - lo, self.k))
                    for t in seqs:
                        t = int(t)
                        if last_use.get(t, -1) >= bi and t not in held:
                            r = slice(int(offsets[t]) - lo, int(offsets[t + 1]) - lo)
                            held[t] = (rows[r].clone(), tg[r])
                s0 = int(offsets[s])
                parts.append(held[s][0][a - s0 : b - s0])
                targets.append(held[s][1][a - s0 : b - s0])
                ahead.append(held[s][0][a - s0 : b_ext - s0])
                if last_use[s] == bi:
                    del held[s]
            cat = parts[0] if len(parts) == 1 else torch.cat(parts)
            tg_cat = targets[0] if len(targets) == 1 else torch.cat(targets)
            yield bi, cat, tg_cat, (torch.cat(ahead) if look else None)

    def _direct_rows(self, look: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``_rows`` for local stores: each batch's pieces decoded straight into one buffer (no block held, no
        per-sequence copy, no concatenation); memory is the prefetched batches alone. Same values, same order."""
        offsets, k = self.cache.offsets, self.k
        width, dtype = self.cache.reads.width(self.packed)
        for bi in range(self.start, len(self.batches)):
            pieces = self.batches[bi]
            # with lookahead each piece is read once, extended; the piece rows are then gathered from it
            spans = [(a, min(b + look, int(offsets[s + 1])) if look else b) for s, a, b in pieces]
            buf = torch.empty((sum(b - a for a, b in spans), width), dtype=dtype)
            o, own = 0, []
            for (a, b), (_, _, piece_end) in zip(spans, pieces, strict=True):
                self.cache.reads.into(a, b, buf[o : o + b - a], self.packed)
                own.append(np.arange(o, o + piece_end - a))
                o += b - a
            tg = np.concatenate([targets_for(self.labels, offsets, piece, k) for piece in pieces])
            hidden = buf[torch.from_numpy(np.concatenate(own))] if look else buf
            yield bi, hidden, torch.from_numpy(tg), (buf if look else None)

    def _ahead_idx(self, pieces: list[Piece]) -> np.ndarray:
        offsets, out, base = self.cache.offsets, [], 0
        for s, a, b in pieces:
            end = int(offsets[s + 1])
            p = np.arange(b - a)[:, None] + 1 + np.arange(self.k)[None, :]  # local row of t+1+i
            out.append(np.where(a + p < end, base + p, -1))
            base += min(b + self.lookahead, end) - a
        return np.concatenate(out)

    def _position_items(self) -> Iterator[Batch]:
        """The plan's batches: positions gathered from at most two windows held at a time."""
        plan, k, held = self.plan, self.k, {}
        windows = self._rows()
        for j, gi in enumerate(range(self.first * self.world + self.rank, len(plan), self.world), self.first):
            cut = slice(gi * plan.batch, (gi + 1) * plan.batch)
            w, loc = plan.window[cut], plan.local[cut]
            while int(w[-1]) not in held:
                wi, hw, tw, _ = next(windows)
                lens = [b - a for _, a, b in plan.windows[wi]]
                held[wi] = (hw, tw, np.repeat(np.cumsum(lens), lens))  # + end of each row's sequence in the window
            for old in [x for x in held if x < int(w[0])]:
                del held[old]
            parts = []
            for wi in np.unique(w):
                sel = loc[w == wi]
                parts.append((int(wi), sel))
            hidden = torch.cat([held[wi][0][torch.from_numpy(sel)] for wi, sel in parts])
            tg = torch.cat([held[wi][1][torch.from_numpy(sel)] for wi, sel in parts])
            item = Batch(hidden, tg, j)
            if self.lookahead:  # rows t+1+i of each position (same sequence), gathered once each
                aheads, idx, base = [], [], 0
                for wi, sel in parts:
                    rows = sel[:, None] + 1 + np.arange(k)[None, :]
                    ok = rows < held[wi][2][sel][:, None]
                    uniq, inv = np.unique(rows[ok], return_inverse=True)
                    ix = np.full(rows.shape, -1, dtype=np.int64)
                    ix[ok] = inv + base
                    aheads.append(held[wi][0][torch.from_numpy(uniq)])
                    idx.append(ix)
                    base += len(uniq)
                item.ahead, item.ahead_idx = torch.cat(aheads), torch.from_numpy(np.concatenate(idx))
            yield item

    def _items(self) -> Iterator[Batch]:
        if self.plan is not None:
            yield from self._position_items()
            return
        for bi, hidden, tg, ahead in self._rows():
            item = Batch(hidden, tg, bi)
            if ahead is not None:
                item.ahead, item.ahead_idx = ahead, torch.from_numpy(self._ahead_idx(self.batches[bi]))
            yield item

    def _run(self) -> None:
        try:
            for item in self._items():
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

    def __iter__(self) -> Iterator[Batch]:
        if self.thread is None:  # in memory: nothing to overlap, and a thread would only contend for the GIL
            yield from self._items()
            return
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        if self.thread is None:
            return
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass
