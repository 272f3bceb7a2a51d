"""Stored forms of hidden states: bf16 as uint16 bit patterns, and the int8 codec (one float32 scale per group of
channels of each row), with the packed form the loader moves to the device."""

from __future__ import annotations

import numpy as np
import torch


def default_int8_group(hidden_size: int) -> int:
    """The int8 codec's default group: the largest divisor of the hidden size that is <= 128 (128 for 4096 and 3584,
    96 for SmolLM2's 576); ``dump --int8-group`` and every store writer use it."""
    return max(g for g in range(1, min(128, hidden_size) + 1) if hidden_size % g == 0)


def int8_encode(hidden: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per ``group`` channels of each row: q = round(x / s), s = absmax / 127.

    Per-group scales (not per-row) keep the few outlier channels of real post-norm states from flattening every
    other channel of the row to a handful of levels. A NaN/Inf row gives a NaN scale (the row is in bad_rows)."""
    x = hidden.float().reshape(hidden.shape[0], -1, group)
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, (x / scale.clamp_min(torch.finfo(torch.float32).tiny)).round(), torch.zeros_like(x))
    bad = ~torch.isfinite(scale)
    q = torch.where(bad, torch.zeros_like(q), q).clamp(-127, 127).to(torch.int8)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return q.reshape(hidden.shape), scale.squeeze(-1)


def int8_decode(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    n, h = q.shape
    return (q.reshape(n, -1, group).float() * scale.unsqueeze(-1)).reshape(n, h)


def int8_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One int8 tensor [T, H + 4 * H/g] per row: the codes, then the row's float32 scales as bytes.

    Rows stay rows, so a loader slices, concatenates and indexes packed rows exactly as decoded ones, moves
    about a quarter of float32's bytes to the device and decodes there (``int8_unpack``)."""
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=1)


def int8_unpack(packed: torch.Tensor, hidden_size: int, group: int) -> torch.Tensor:
    """float32 [T, H] from ``int8_pack``'s rows, on whatever device they are."""
    q, s = packed[:, :hidden_size], packed[:, hidden_size:].contiguous().view(torch.float32)
    return int8_decode(q, s, group)


def to_stored(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return hidden.to(torch.float32).contiguous().numpy()


def from_stored(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
