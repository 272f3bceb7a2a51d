"""The draft vocabulary, built exactly as Eagle3 (SpecForge) builds it.

1. Count how often each target token occurs at loss-masked (assistant) positions of the tokenised,
   truncated data.
2. Take the ``draft_vocab_size`` most frequent. Tie-break: higher count first, then *lower token id*
   first. (SpecForge uses ``Counter.most_common``, whose ties follow first-seen order; ours does not
   depend on data order or on the number of dump processes.) When fewer distinct tokens were seen than
   ``draft_vocab_size``, the lowest unseen ids fill the rest, as SpecForge pads from ``range(N)``.
3. Sort the chosen ids by target id: draft id ``d`` is the rank of its target id.
4. ``d2t[d] = target_id - d`` (int64 offsets) and ``t2d`` is a bool mask over the target vocabulary.

A draft size >= the target vocabulary is the identity mapping (d2t all zero, t2d all true).
``labels()`` turns token ids into training labels: the draft id of each assistant token inside the
draft vocabulary, ``IGNORE`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

IGNORE = -100


@dataclass
class VocabMapping:
    d2t: np.ndarray  # int64 [D]: target_id - draft_id
    t2d: np.ndarray  # bool [V]

    @property
    def draft_size(self) -> int:
        return len(self.d2t)

    @property
    def target_size(self) -> int:
        return len(self.t2d)

    @property
    def draft_to_target(self) -> np.ndarray:
        """int64 [D]: target token id of each draft id (vLLM's ``token_map``)."""
        return self.d2t + np.arange(len(self.d2t), dtype=np.int64)

    def target_to_draft(self) -> np.ndarray:
        """int64 [V]: draft id of each target token, ``IGNORE`` outside the draft vocabulary."""
        out = np.full(len(self.t2d), IGNORE, dtype=np.int64)
        out[self.draft_to_target] = np.arange(len(self.d2t))
        return out

    def labels(self, input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
        lab = self.target_to_draft()[input_ids].astype(np.int32)
        lab[~loss_mask.astype(bool)] = IGNORE
        return lab

    def validate(self, where: str) -> None:
        t = self.draft_to_target
        if self.t2d.dtype != np.bool_ or self.d2t.dtype != np.int64:
            raise UserError(f"{where}: d2t must be int64 and t2d bool (got {self.d2t.dtype}, {self.t2d.dtype})")
        if len(t) and (np.any(np.diff(t) <= 0) or t[0] < 0 or t[-1] >= len(self.t2d)):
            raise UserError(f"{where}: d2t does not map draft ids to increasing target ids inside the vocabulary")
        if int(self.t2d.sum()) != len(t) or not self.t2d[t].all():
            raise UserError(f"{where}: d2t and t2d disagree ({len(t)} draft ids, {int(self.t2d.sum())} set in t2d)")

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.d2t.tobytes() + np.packbits(self.t2d).tobytes()).hexdigest()[:16]


def count_tokens(examples, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ex in examples:
        counts += np.bincount(ex.input_ids[ex.loss_mask], minlength=vocab_size)[:vocab_size]
    return counts


def build_mapping(counts: np.ndarray, draft_vocab_size: int) -> VocabMapping:
    vocab = len(counts)
    if draft_vocab_size >= vocab:
        return VocabMapping(np.zeros(vocab, dtype=np.int64), np.ones(vocab, dtype=bool))
    # lexsort: last key is primary -> sort by count descending, then id ascending
    order = np.lexsort((np.arange(vocab), -counts))
    chosen = np.sort(order[:draft_vocab_size]).astype(np.int64)
    t2d = np.zeros(vocab, dtype=bool)
    t2d[chosen] = True
    return VocabMapping(chosen - np.arange(draft_vocab_size, dtype=np.int64), t2d)


def load_mapping(path: str | Path, vocab_size: int) -> VocabMapping:
    """Our ``vocab_mapping.safetensors``, SpecForge's ``vocab_mapping.pt`` (loaded with weights_only) or a heads
    directory (its ``vocab_mapping.safetensors``): what a held-out dump reuses (a cache store: ``dump``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--vocab-mapping: file not found: {path}")
    if path.is_dir():  # a cache store's mapping is read by the dump (store.Cache.mapping): no store import here
        if (path / "vocab_mapping.safetensors").is_file():
            return load_mapping(path / "vocab_mapping.safetensors", vocab_size)
        raise UserError(f"--vocab-mapping: {path} is a directory but neither a medusa-cache store nor a heads "
                        "directory (no vocab_mapping.safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            d = load_file(str(path))
        else:
            import torch

            d = torch.load(path, map_location="cpu", weights_only=True)
            d = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in d.items()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"--vocab-mapping: cannot read {path}: {e}") from None
    if "d2t" not in d or "t2d" not in d:
        raise UserError(f"--vocab-mapping: {path} has no 'd2t' and 't2d' entries (found: {sorted(d)})")
    m = VocabMapping(np.asarray(d["d2t"]).astype(np.int64), np.asarray(d["t2d"]).astype(bool))
    if m.target_size != vocab_size:
        raise UserError(
            f"--vocab-mapping: {path} covers a vocabulary of {m.target_size} tokens, the model has {vocab_size}"
        )
    m.validate(f"--vocab-mapping: {path}")
    return m


def save_mapping(m: VocabMapping, path: str | Path) -> None:
    from safetensors.numpy import save_file

    save_file({"d2t": m.d2t, "t2d": m.t2d}, str(path))


def top_mapping(counts: np.ndarray, draft_vocab_size: int, flag: str = "--draft-vocab-size") -> VocabMapping:
    """The draft vocabulary ``dump --draft-vocab-size N`` builds from these assistant-token ``counts`` (a cache's
    ``token_counts``): Eagle3's top-N, same rule and tie-break (``build_mapping``)."""
    if draft_vocab_size > len(counts):
        raise UserError(f"{flag} {draft_vocab_size} is larger than the model's vocabulary ({len(counts)}); give at "
                        f"most {len(counts)}")
    return build_mapping(counts, draft_vocab_size)


def coverage(counts: np.ndarray, sizes: list[int]) -> dict[int, float]:
    """Fraction of the assistant tokens (``counts``) inside each size's top-N draft vocabulary built from the same
    counts: the ceiling of any head's top-1."""
    cum = np.cumsum(np.sort(np.asarray(counts, dtype=np.int64))[::-1])
    return {n: float(cum[min(n, len(cum)) - 1] / max(1, int(cum[-1]))) for n in sizes}
