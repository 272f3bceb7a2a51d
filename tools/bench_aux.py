"""Bytes per token of a cache with and without Eagle3's auxiliary layers (`dump --aux-layers`), bf16 and int8.

    python tools/bench_aux.py --model ~/.cache/medusa-cache/smollm2-135m-instruct --data chats.jsonl --rows 64
    python tools/bench_aux.py --quick      # the bundled stories260K over 8 story openings (what CI runs)

Dumps the same rows twice, ``--hidden-codec lossless`` (bf16) and ``int8``, each with ``--aux-layers`` (default
eagle3: three layers), and reads each store's bytes on disk per array: the store without the auxiliary layers is the
same store less ``aux_hidden`` (and ``aux_scale``), so one dump per codec measures both. Prints bytes per token of the
whole store, of ``hidden``'s share and of the auxiliary layers' share, and the ratio with/without.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def array_bytes(store: Path, names: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for n in names for f in (store / n).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--rows", type=int, default=64, help="first rows of the data to dump")
    ap.add_argument("--aux-layers", default="eagle3")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="stories260K, 8 openings, --aux-layers 1,2,3")
    a = ap.parse_args()
    import json

    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.store import Cache

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.quick:
            a.model, a.aux_layers, a.rows = str(REPO / "medusa_cache" / "demo" / "stories260K"), "1,2,3", 8
            a.data = [str(REPO / "medusa_cache" / "demo" / "prompts.jsonl")]
        if not (a.model and a.data):
            ap.error("--model and --data are required (or --quick)")
        rows = []
        for f in a.data:
            text = Path(f).read_text()
            rows += json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                              if x.strip()]
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[: a.rows]))
        print(f"model {a.model}, {min(a.rows, len(rows))} rows, --aux-layers {a.aux_layers}\n")
        print("| codec | tokens | bytes/token without aux | with aux | ratio | hidden | aux layers (each) |")
        print("|---|---|---|---|---|---|---|")
        for codec in ("lossless", "int8"):
            out = tmp / codec
            run_dump(DumpConfig(model=a.model, data=[str(data)], out=str(out), aux_layers=a.aux_layers,
                                hidden_codec=codec, max_length=a.max_length))
            c = Cache(out)
            n, layers = c.n_tokens, len(c.meta.aux_layers)
            total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            aux = array_bytes(out, ("aux_hidden", "aux_scale"))
            hidden = array_bytes(out, ("hidden", "hidden_scale"))
            name = "bf16" if codec == "lossless" else f"int8 (group {c.int8_group})"
            print(f"| {name} | {n:,} | {(total - aux) / n:,.0f} | {total / n:,.0f} | {total / (total - aux):.2f}x | "
                  f"{hidden / n:,.0f} | {aux / n:,.0f} ({aux / n / layers:,.0f}) |")


if __name__ == "__main__":
    main()
