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

Reading: ``stream.BatchStream`` (a background thread walks the batches ahead of the trainer, loads each block once
when its first sequence is needed and keeps only sequences still to come: memory is bounded by the shuffle buffer
plus one block, whatever the cache size; ``in_memory`` reads the store once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .store import any_in_window
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
