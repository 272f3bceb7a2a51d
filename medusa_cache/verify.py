"""``medusa-cache verify STORE [--deep]``: is this cache whole and self-consistent?

Checks (each failure is one named problem; exit code 0 only when there are none):
format version known; every array present with the shape the offsets imply; offsets start at 0, increase
and end at N; d2t/t2d agree; labels equal what input_ids, loss_mask and the stored mapping imply;
token_counts match the assistant tokens; the ``complete`` flag agrees with ``unit_done``; fingerprints
present. ``--deep`` also decodes every unit of ``hidden`` (naming any unreadable one) and counts NaN/Inf
values, locating them by sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UserError
from .store import SMALL_ARRAYS, Cache, ChunkError


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

    mp = ModelPass(model, c.hidden_dtype, device)
    ids = c.array("input_ids")
    forward_tokens = int((c.meta.dump_args or {}).get("forward_tokens") or 16384)
    problems = []
    rng = np.random.default_rng(seed)
    tol = 1e-4 if c.hidden_dtype == "float32" and c.codec == "lossless" else 2 ** -6
    for s in sorted(rng.choice(c.n_seqs, size=min(n, c.n_seqs), replace=False).tolist()):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        ref = dumped_rows(c, ids, mp, s, forward_tokens).float()
        got = c.read_hidden(a, b).float()
        if c.row_kept is not None:  # rows not stored read as 0: compare the stored ones
            keep = torch.from_numpy(c.row_kept[a:b])
            ref, got = ref[keep], got[keep]
        err = ((got - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1e-6)).max().item()
        if not err <= tol:
            problems.append(f"sequence {s}: stored hidden states differ from a fresh model run (max relative "
                            f"error {err:.3g} > {tol:g})")
    return problems


def dumped_rows(c: Cache, ids: np.ndarray, mp, s: int, forward_tokens: int):
    """Sequence ``s``'s rows recomputed as the dump computed them: in each unit it touches, the batch of
    ``plan_batches`` that holds it, run whole (padding and neighbours included)."""
    import torch

    from .backbone import plan_batches

    a, b = int(c.offsets[s]), int(c.offsets[s + 1])
    out = torch.empty((b - a, c.hidden_size))
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


def verify(path: str, deep: bool = False, model: str | None = None, samples: int = 4,
           allow_partial: bool = False) -> dict[str, Any]:
    problems: list[str] = []
    try:
        c = Cache(path)  # raises on a missing group, a foreign group or a newer format
    except ChunkError as e:  # an array every reader needs at open (seq_offsets, row_kept) is damaged
        return {"store": str(path), "healthy": False, "problems": [str(e)], "complete": False, "units_done": "?",
                "deep": deep, "nonfinite_rows": 0}
    if not c.complete and not allow_partial:
        done = c.done_units()
        problems.append(f"incomplete: {int(done.sum())}/{c.n_units} units dumped (missing units "
                        f"{np.flatnonzero(~done)[:10].tolist()}); finish it with `medusa-cache dump ... --resume`, "
                        "or pass --allow-partial to accept a partial store")
    try:
        problems += c.missing_chunks()  # through the store's own listing: local and s3:// alike
    except Exception as e:  # noqa: BLE001
        problems.append(f"cannot list the store's chunks: {e}")
    for name in SMALL_ARRAYS:  # every chunk of every small array read through zarr: checksums (format 5) checked
        if name in c.group:
            try:
                c.stored(name)
            except ChunkError as e:
                problems.append(str(e))
    if any(isinstance(p, str) and "cannot be read" in p for p in problems):
        return {"store": c.path, "healthy": False, "problems": problems, "complete": c.complete,
                "units_done": "?", "deep": deep, "nonfinite_rows": 0}
    n, s = c.n_tokens, c.n_seqs
    off = c.offsets
    if off[0] != 0 or (np.diff(off) <= 0).any():
        problems.append("seq_offsets must start at 0 and strictly increase")
    m_rows = n if c.row_kept is None else int(c.row_kept.sum())  # rows of `hidden`
    shapes = [("input_ids", (n,)), ("loss_mask", (n,)), ("labels", (n,)), ("seq_source", (s, 2)),
              ("hidden", (m_rows, c.hidden_size)), ("bad_rows", (m_rows,)), ("unit_done", (c.n_units,))]
    if c.codec == "int8":
        shapes.append(("hidden_scale", (m_rows, c.hidden_size // max(c.int8_group, 1))))
    if c.row_kept is not None:
        shapes.append(("row_kept", (n,)))
        from .store import needed_rows

        if not np.array_equal(c.row_kept, needed_rows(c.array("loss_mask"), off, c.meta.max_heads)):
            problems.append(f"row_kept disagrees with loss_mask for --max-heads {c.meta.max_heads}")
    for name, shape in shapes:
        if name not in c.group:
            if name != "bad_rows":  # stores written before bad_rows existed
                problems.append(f"array {name} is missing")
        elif tuple(c.group[name].shape) != shape:
            problems.append(f"array {name} has shape {tuple(c.group[name].shape)}, expected {shape}")
    try:
        m = c.mapping()
        m.validate("d2t/t2d")
        if m.target_size != c.meta.vocab_size or m.draft_size != c.meta.draft_vocab_size:
            problems.append("d2t/t2d sizes disagree with the vocab_size/draft_vocab_size attributes")
        ids, mask, labels = c.array("input_ids"), c.array("loss_mask").astype(bool), c.array("labels")
        bad = np.flatnonzero(m.labels(ids, mask) != labels)
        if len(bad):
            problems.append(f"{len(bad)} labels disagree with input_ids/loss_mask/mapping (first at token {bad[0]})")
        counts = c.array("token_counts")
        if counts.sum() != mask.sum():
            problems.append(f"token_counts sum {counts.sum()} != assistant tokens {mask.sum()}")
        if c.meta.counts.get("assistant_tokens") not in (None, int(mask.sum())):
            problems.append("the counts attribute disagrees with loss_mask")
    except UserError as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - an unreadable array
        problems.append(f"cannot read metadata arrays: {e}")
    done = c.done_units()
    if c.complete and not done.all():
        problems.append(f"marked complete but units {np.flatnonzero(~done)[:10].tolist()} are not done")
    for key in ("model", "tokenizer", "chat_template", "data", "vocab"):
        if key not in c.meta.fingerprints:
            problems.append(f"fingerprint '{key}' is missing")
    nonfinite, bad_seqs = 0, set()
    if deep:
        for k in np.flatnonzero(done):
            a, b = c.unit_range(int(k))
            broken = False
            for name in ("hidden", "hidden_scale") if c.codec == "int8" else ("hidden",):
                try:
                    c._read(name, a, b, direct=False)  # zarr's own decode, chunk checksums included
                except UserError as e:
                    problems.append(f"unit {k} ({name} rows {a}:{b}, shard {name}/c/{k}/0) cannot be decoded: "
                                    f"{str(e).split('cannot be read ', 1)[-1]}")
                    broken = True
            if broken:
                continue
            h = c.read_rows(a, b, direct=False).float()
            rows = c.token_of_row(np.flatnonzero(~torch_isfinite_rows(h)) + a)
            nonfinite += len(rows)
            bad_seqs.update((np.searchsorted(off, rows, side="right") - 1).tolist())
        if nonfinite:
            problems.append(f"{nonfinite} token rows hold NaN/Inf, in sequences {sorted(bad_seqs)[:20]}")
    if model:
        problems += spot_check(c, model, samples)
    return {"store": c.path, "healthy": not problems, "problems": problems, "complete": c.complete,
            "units_done": f"{int(done.sum())}/{c.n_units}", "deep": deep, "nonfinite_rows": nonfinite}


def torch_isfinite_rows(h) -> np.ndarray:
    import torch

    return torch.isfinite(h).all(dim=1).numpy()
