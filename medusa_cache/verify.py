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
from .store import Cache


def spot_check(c: Cache, model: str, n: int = 4, seed: int = 0, device: str = "cpu") -> list[str]:
    """Recompute ``n`` random sequences alone with the model and compare (catches pre-norm or batch bugs).

    A sequence run alone must match the stored rows to kernel rounding: float32 within 1e-4 relative,
    bf16 within 2 bf16 ulps of the row's scale.
    """
    from .fingerprint import model_fingerprint

    if model_fingerprint(model) != c.meta.fingerprints.get("model"):
        return [f"--model: {model} is not the model this cache was dumped with (fingerprint differs)"]
    import torch

    from .backbone import ModelPass

    mp = ModelPass(model, c.hidden_dtype, device)
    ids = c.array("input_ids")
    problems = []
    rng = np.random.default_rng(seed)
    for s in sorted(rng.choice(c.n_seqs, size=min(n, c.n_seqs), replace=False).tolist()):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        ref = mp.run(ids, [(a, b, a)])[0].float()
        got = c.read_hidden(a, b).float()
        if c.row_kept is not None:  # rows not stored read as 0: compare the stored ones
            keep = torch.from_numpy(c.row_kept[a:b])
            ref, got = ref[keep], got[keep]
        tol = 1e-4 if c.hidden_dtype == "float32" and c.codec == "lossless" else 2 ** -6
        err = ((got - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1e-6)).max().item()
        if not err <= tol:
            problems.append(f"sequence {s}: stored hidden states differ from a fresh model run (max relative "
                            f"error {err:.3g} > {tol:g})")
    return problems


def verify(path: str, deep: bool = False, model: str | None = None, samples: int = 4,
           allow_partial: bool = False) -> dict[str, Any]:
    problems: list[str] = []
    c = Cache(path)  # raises on a missing group, a foreign group or a newer format
    if not c.complete and not allow_partial:
        done = c.done_units()
        problems.append(f"incomplete: {int(done.sum())}/{c.n_units} units dumped (missing units "
                        f"{np.flatnonzero(~done)[:10].tolist()}); finish it with `medusa-cache dump ... --resume`, "
                        "or pass --allow-partial to accept a partial store")
    try:
        problems += c.missing_chunks()  # through the store's own listing: local and s3:// alike
    except Exception as e:  # noqa: BLE001
        problems.append(f"cannot list the store's chunks: {e}")
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
            try:
                h = c.read_rows(a, b, direct=False).float()  # zarr's own decode, checksums included
            except UserError:
                problems.append(f"unit {k} (hidden rows {a}:{b}, shard hidden/c/{k}/0) cannot be decoded")
                continue
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
