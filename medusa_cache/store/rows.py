"""Which rows a store holds and which sequence owns a row: pure functions of the offsets and masks."""

from __future__ import annotations

import numpy as np


def needed_rows(loss_mask: np.ndarray, offsets: np.ndarray, max_heads: int) -> np.ndarray:
    """Which token rows a reader with up to ``max_heads`` heads can use (``dump --keep-rows needed``).

    Row t is needed when any token t-K+1 .. t+K+1 of its own sequence is an assistant token (K = max_heads):
    heads at t train on t+2..t+K+1, ``eval`` scores t when t+1 is an assistant token, and ``eval --base-model``
    and ``--distill`` read the base model's choice from rows t+1..t+K of a scored position."""
    return any_in_window(np.asarray(loss_mask).astype(bool), offsets, 1 - max_heads, max_heads + 2)


def any_in_window(flags: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """bool [N]: any of ``flags[t+lo : t+hi]`` inside t's own sequence, for every row t (vectorised, one cumsum)."""
    c = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    t = np.arange(len(flags))
    seq = seq_of(offsets, t)
    a = np.clip(t + lo, offsets[seq], offsets[seq + 1])
    b = np.clip(t + hi, offsets[seq], offsets[seq + 1])
    return c[b] - c[a] > 0



def seq_of(offsets: np.ndarray, rows) -> np.ndarray:
    """Index of the sequence that owns token row(s) ``rows`` (``offsets``: [S+1] sequence starts, then N)."""
    return np.searchsorted(offsets, rows, side="right") - 1
