"""Benchmark `medusa-cache dump`; prints ratios measured in this one run.

A tiny Llama built from a config (hidden 512, 8 layers; the Llama-3 vocabulary of 128,256, since the
Llama-3 tokenizer's ids need it) over the real conversations in ../shared/fixtures/chat/.

(a) dump wall time / bare decoder-forward time over the same batches        target <= 1.10
(b) real tokens / computed (padded) tokens                                  target >= 0.95
(c) bytes per token on disk / (2 * H)  (bf16 hidden states, all arrays)

    python tools/bench_dump.py [--hidden 512] [--layers 8] [--rows 300] [--dtype float32]
    python tools/bench_dump.py --quick     # seconds: hidden 64, 2 layers, 12 rows per file (what CI runs)

Rows the Llama-3 template cannot render (glaive rows with tools) are skipped (--skip-bad-rows) and counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIX = REPO.parent / "shared" / "fixtures"
if not (FIX / "chat").is_dir():  # a clone with nothing beside it: the vendored copies
    FIX = REPO / "tests" / "fixtures"

from medusa_cache.backbone import ModelPass, plan_batches  # noqa: E402
from medusa_cache.dump import DumpConfig, open_or_prepare, run_dump  # noqa: E402
from medusa_cache.store import Cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=300, help="conversations taken from each chat file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--forward-tokens", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="a small model and few rows (what CI runs)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target (CI checks (b), the "
                    "token accounting, which timing noise cannot move; (a) only on a quiet machine)")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.layers, a.rows, a.forward_tokens = 64, 2, 12, 2048
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128256, hidden_size=a.hidden, intermediate_size=a.hidden * 2,
                          num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=4096)
        LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
        sys.path.insert(0, str(REPO / "tools"))
        from quick import tokenizer_dir

        tok = tokenizer_dir(FIX / "tokenizers" / "llama3")  # the vendored copy is xz-compressed
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, tmp / "model" / f)
        data = []
        for f in sorted((FIX / "chat").glob("*.json")):
            rows = json.loads(f.read_text())[: a.rows]
            p = tmp / f.name
            p.write_text(json.dumps(rows))
            data.append(str(p))
        dc = DumpConfig(model=str(tmp / "model"), data=data, out=str(tmp / "cache"), dtype=a.dtype,
                        draft_vocab_size=32000, max_length=2048, forward_tokens=a.forward_tokens,
                        skip_bad_rows=True)
        # the same batches as the dump will run: plan them from the prepared layout, warm the kernels once
        c = open_or_prepare(dc)
        ids = c.array("input_ids")
        plans = [plan_batches(c.offsets, *c.unit_range(k), a.forward_tokens) for k in range(c.n_units)]
        mp = ModelPass(dc.model, a.dtype, "cpu")
        mp.run(ids, plans[0][0])
        t0 = time.perf_counter()
        for plan in plans:
            for batch in plan:
                mp.run(ids, batch)
        bare = time.perf_counter() - t0
        del mp
        t0 = time.perf_counter()
        s = run_dump(replace(dc, overwrite=True))  # everything: tokenise, vocab, model load, forward, write
        dump_wall = time.perf_counter() - t0
        c = Cache(tmp / "cache")
        hidden_bytes = sum(f.stat().st_size for f in (tmp / "cache" / "hidden").rglob("*") if f.is_file())
        disk = c.disk_bytes()
        print(f"model: hidden {a.hidden}, {a.layers} layers, dtype {a.dtype}; data: {s['sequences']} conversations,"
              f" {s['tokens']} tokens, {c.n_units} units; {s.get('skipped_input_rows', 0)} input rows skipped "
              "(--skip-bad-rows)")
        print(f"(a) dump wall {dump_wall:.1f}s / bare forward {bare:.1f}s = {dump_wall / bare:.3f}   (target <= 1.10)")
        print(f"    dump phases: prepare (tokenise, vocab, store) {s['seconds_prepare']}s, model load "
              f"{s['seconds_model_load']}s, units (forward + overlapped writes) {s['seconds_units']}s")
        print(f"(b) real / computed tokens = {s['real_over_computed']:.3f}   (target >= 0.95)")
        missed = [f"(b) {s['real_over_computed']:.3f} < 0.95"] if s["real_over_computed"] < 0.95 else []
        if not a.quick and dump_wall / bare > 1.10:
            missed.append(f"(a) {dump_wall / bare:.3f} > 1.10")
        bpt = disk / c.n_tokens
        print(f"(c) bytes/token on disk {bpt:.1f} / 2H {2 * a.hidden} = {bpt / 2 / a.hidden:.3f}"
              f"   (hidden alone: {hidden_bytes / c.n_tokens:.1f} B/token, raw {c.hidden.dtype.itemsize * a.hidden})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.check and missed:
        sys.exit("targets missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
