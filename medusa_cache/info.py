"""``medusa-cache inspect``: what a cache holds and how far its dump got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .config import check
from .store import Cache
from .vocab import coverage as vocab_coverage

DEFAULT_COVERAGE = (1000, 4000, 8000, 16000, 32000)


@dataclass
class InspectConfig:
    """medusa-cache inspect cache.zarr [--json] [--coverage 1000,4000,8000]"""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("store",)
    store: str
    """the cache store (a directory or an fsspec URL)"""
    json: bool = False
    """print JSON"""
    coverage: list[int] | None = None
    """draft vocabulary sizes whose coverage of the assistant tokens to show (default: 1000,4000,8000,16000,32000)"""

    def __post_init__(self) -> None:
        check(self.coverage is None or min(self.coverage) >= 1, "coverage", f"sizes must be >= 1, got {self.coverage}")


def inspect_store(path: str, coverage: list[int] | None = None) -> dict[str, Any]:
    """What ``inspect`` prints; ``coverage``: draft vocabulary sizes whose share of the assistant tokens is shown
    (each the top-N a dump or ``train --draft-vocab-size N`` builds from this cache's counts)."""
    c = Cache(path)
    counts = c.meta.counts
    done = c.done_units()
    disk = c.disk_bytes()
    assistant = counts.get("assistant_tokens", 0)
    from .store.spec import ARRAYS

    missing = [a.name for a in ARRAYS if a.present(c.meta) and a.name not in c.group]
    return {
        "store": c.path,
        "format_version": c.meta.medusa_cache,
        # the flag the dump set, unless an array is gone since: then the store is not whole, whatever the flag says
        "complete": c.complete if not missing else
        f"False: array {', '.join(missing)} missing (the dump finished, the store was damaged since): re-dump it",
        "units_done": f"{int(done.sum())}/{c.n_units}",
        "sequences": c.n_seqs,
        "tokens": c.n_tokens,
        "assistant_tokens": assistant,
        "assistant_in_draft_vocab": round(counts.get("assistant_tokens_in_draft_vocab", 0) / max(1, assistant), 4),
        "hidden_size": c.hidden_size,
        "hidden_dtype": c.hidden_dtype,
        "hidden_codec": c.codec + (f" (scale per {c.int8_group} channels)" if c.codec == "int8" else ""),
        "keep_rows": c.meta.keep_rows + (f" (rows for up to {c.meta.max_heads} heads: {c.n_rows} of {c.n_tokens})"
                                         if c.meta.keep_rows == "needed" else ""),
        "vocab_size": c.meta.vocab_size,
        "draft_vocab_size": c.meta.draft_vocab_size,
        "aux_layers": (f"{c.meta.aux_layers} (aux_hidden: {_bytes(c, 'aux_hidden') / max(1, c.n_tokens):.1f} bytes "
                       "per token)") if c.meta.aux_layers else "none",
        "bytes_on_disk": disk,
        "bytes_per_token": round(disk / max(1, c.n_tokens), 1),
        "chunk_tokens": c.meta.chunk_tokens,
        "shard_tokens": c.shard_tokens,
        "draft_vocab_coverage": {str(n): round(v, 4) for n, v in vocab_coverage(c.stored("token_counts"),
            sorted({min(n, c.meta.vocab_size) for n in (coverage or DEFAULT_COVERAGE)})).items()},
        "counts": counts,
        "fingerprints": c.meta.fingerprints,
    }


def _bytes(c: Cache, *names: str) -> int:
    """Bytes on disk of some arrays of a local store (their scales included for int8)."""
    from pathlib import Path

    from .store import is_url

    if is_url(c.path):
        return 0
    names = (*names, *(n.replace("hidden", "scale") for n in names if n.startswith("aux")))
    return sum(f.stat().st_size for n in names for f in (Path(c.path) / n).rglob("*") if f.is_file())


def render(info: dict[str, Any]) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {kk}: {vv}" for kk, vv in v.items()]
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)
