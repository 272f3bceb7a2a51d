"""``medusa-cache verify STORE [--deep]``: is this cache whole and self-consistent?

Checks (each failure is one named problem; exit code 0 only when there are none):
format version known; every array present with the shape the offsets imply; offsets start at 0, increase
and end at N; d2t/t2d agree; labels equal what input_ids, loss_mask and the stored mapping imply;
token_counts match the assistant tokens; the ``complete`` flag agrees with ``unit_done``; fingerprints
present. ``--deep`` also decodes every unit of ``hidden`` (naming any unreadable one) and counts NaN/Inf
values, locating them by sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .config import check
from .store import SMALL_ARRAYS, Cache, ChunkError, audit


@dataclass
class VerifyConfig:
    """medusa-cache verify cache.zarr [--deep] [--model PATH/TO/MODEL --samples 8] [--allow-partial] [--json]"""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("store",)
    store: str
    """the cache store (a directory or an fsspec URL)"""
    deep: bool = False
    """decode every chunk and look for NaN/Inf"""
    model: str | None = None
    """recompute a few random sequences with this model and compare"""
    samples: int = 4
    """sequences recomputed with --model"""
    allow_partial: bool = False
    """accept an incomplete store (a dump still running or killed) as healthy"""
    json: bool = False
    """print JSON"""

    def __post_init__(self) -> None:
        check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")


def spot_check(c: Cache, model: str, n: int = 4, seed: int = 0, device: str = "cpu") -> list[str]:
    """Recompute ``n`` random sequences with the model and compare (catches pre-norm, batching and storage bugs).

    Like with like: each sequence is recomputed in the very batch the dump ran it in (``plan_batches`` over its
    unit with the dump's ``--forward-tokens``, same dtype), so the fresh rows are what the dump computed up to
    kernel nondeterminism. (Run alone instead, a bf16 sequence of a 30-layer model drifts from its padded-batch
    rows by up to 4% of the row's scale: SmolLM2-135M-Instruct, measured; a false alarm.) Tolerance: float32
    within 1e-4 relative to the row's largest value, bf16 and int8 within 2^-6.
    """
    from .fingerprint import model_fingerprint

    if model_fingerprint(model) != c.meta.fingerprints.get("model"):
        return [f"--model: {model} is not the model this cache was dumped with (fingerprint differs)"]
    import torch

    from .backbone import ModelPass

    aux = tuple(c.meta.aux_layers)
    mp = ModelPass(model, c.hidden_dtype, device, aux)
    ids = c.array("input_ids")
    from .dumpconfig import DumpConfig

    # the dump's batches, or dump's default for a store that did not record them (the class attribute is the default)
    forward_tokens = int((c.meta.dump_args or {}).get("forward_tokens") or DumpConfig.forward_tokens)
    problems = []
    rng = np.random.default_rng(seed)
    tol = 1e-4 if c.hidden_dtype == "float32" and c.codec == "lossless" else 2 ** -6
    for s in sorted(rng.choice(c.n_seqs, size=min(n, c.n_seqs), replace=False).tolist()):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        ref = dumped_rows(c, ids, mp, s, forward_tokens).float()
        got = c.read_hidden(a, b).float()
        if aux:
            got = torch.cat([got, c.read_aux(a, b).float()], dim=1)
        if c.row_kept is not None:  # rows not stored read as 0: compare the stored ones
            keep = torch.from_numpy(c.row_kept[a:b])
            ref, got = ref[keep], got[keep]
        h = c.hidden_size
        for j, what in enumerate(["hidden states", *(f"auxiliary layer {x} (aux_hidden)" for x in aux)]):
            r, g = ref[:, j * h : (j + 1) * h], got[:, j * h : (j + 1) * h]
            err = ((g - r).abs().amax(dim=1) / r.abs().amax(dim=1).clamp_min(1e-6)).max().item()
            if not err <= tol:
                problems.append(f"sequence {s}: stored {what} differ from a fresh model run (max relative "
                                f"error {err:.3g} > {tol:g})")
    return problems


def dumped_rows(c: Cache, ids: np.ndarray, mp, s: int, forward_tokens: int):
    """Sequence ``s``'s rows recomputed as the dump computed them: in each unit it touches, the batch of
    ``plan_batches`` that holds it, run whole (padding and neighbours included)."""
    import torch

    from .backbone import plan_batches

    a, b = int(c.offsets[s]), int(c.offsets[s + 1])
    out = torch.empty((b - a, c.hidden_size * (1 + len(c.meta.aux_layers))))
    for k in range(c.n_units):
        ua, ub = c.unit_tokens(k)
        if ub <= a or ua >= b:
            continue
        for batch in plan_batches(c.offsets, ua, ub, forward_tokens):
            hit = [i for i, p in enumerate(batch) if p[0] == a]
            if hit:
                s0, e, keep = batch[hit[0]]
                out[keep - a : e - a] = mp.run(ids, batch)[hit[0]].float()
                break
    return out


def damaged_chunks(c: Cache, name: str) -> list[str]:
    """Which chunks of a small array cannot be read (checksum or decoding), each with its rows and the shard (unit)
    of the hidden states it belongs to."""
    arr = c.group[name]
    step = int(arr.chunks[0])
    out = []
    for i in range(-(-int(arr.shape[0]) // step)):
        a, b = i * step, min((i + 1) * step, int(arr.shape[0]))
        try:
            arr[a:b]
        except Exception as e:  # noqa: BLE001 - zarr raises the codec's own error
            why = "fails its checksum" if "checksum" in str(e).lower() or "crc" in str(e).lower() else \
                f"cannot be decoded ({type(e).__name__})"
            where = f", unit {a // c.shard_tokens}" if name in ("input_ids", "loss_mask", "labels") else ""
            out.append(f"array {name}: chunk {i} (rows {a}:{b}{where}) {why}: the file changed after the dump wrote "
                       "it; re-dump the store (or restore the file)")
    return out or [f"array {name} cannot be read: re-dump the store (or restore the file)"]


def verify(path: str, deep: bool = False, model: str | None = None, samples: int = 4,
           allow_partial: bool = False) -> dict[str, Any]:
    problems: list[str] = []
    try:
        c = Cache(path)  # raises on a missing group, a foreign group or a newer format
    except ChunkError as e:  # an array every reader needs at open (seq_offsets, row_kept) is damaged
        return {"store": str(path), "healthy": False, "problems": [str(e)], "complete": False, "units_done": "?",
                "deep": deep, "nonfinite_rows": 0, "checked": "nothing more: the store cannot be opened"}
    if not c.complete and not allow_partial:
        done = c.done_units()
        problems.append(f"incomplete: {int(done.sum())}/{c.n_units} units dumped (missing units "
                        f"{np.flatnonzero(~done)[:10].tolist()}); finish it with `medusa-cache dump ... --resume`, "
                        "or pass --allow-partial to accept a partial store")
    try:
        problems += audit.missing_chunks(c)  # through the store's own listing: local and s3:// alike
    except Exception as e:  # noqa: BLE001
        problems.append(f"cannot list the store's chunks: {e}")
    for name in SMALL_ARRAYS:  # every chunk of every small array read through zarr: checksums (format 5) checked
        if name in c.group:
            try:
                c.stored(name)
            except ChunkError:
                problems += damaged_chunks(c, name)
    if any(p.startswith("array ") and " chunk " in p or "cannot be read" in p for p in problems):
        return {"store": c.path, "healthy": False, "problems": problems, "complete": c.complete,
                "units_done": "?", "deep": deep, "nonfinite_rows": 0,
                "checked": "the listing and small arrays; stopped at the unreadable one"}
    problems += audit.structure(c)
    if not any(p.startswith("array ") for p in problems):  # a missing or damaged array is named once, above
        problems += audit.consistency(c)
    more, bytes_read = audit.chunk_checksums(c)  # every hidden chunk's bytes against its CRC32C, nothing decoded
    problems += more
    nonfinite = 0
    if deep:
        more, nonfinite = audit.decode_units(c)
        problems += more
    if model:
        problems += spot_check(c, model, samples)
    problems = list(dict.fromkeys(problems))  # one line per problem, however many checks found it
    return {"store": c.path, "healthy": not problems, "problems": problems, "complete": c.complete,
            "units_done": f"{int(c.done_units().sum())}/{c.n_units}", "deep": deep, "nonfinite_rows": nonfinite,
            "checked": "every chunk decoded (--deep)" if deep else "every chunk's checksum" if bytes_read else
            "small arrays' checksums; hidden chunks not read (object storage: --deep decodes them)"}

