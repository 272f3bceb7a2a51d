"""`generate` throughput on chat rows: batched (rows grouped by length) vs one row per generate() call, same run.

    python tools/bench_generate.py --model ~/.cache/medusa-cache/smollm2-135m-instruct \
        --prompts /tmp/smol/data/heldout.jsonl --rows 16 --max-new-tokens 64
    python tools/bench_generate.py --quick        # seconds: the tiny stories260K model, text rows (what CI runs)

Both runs answer the same rows with the same greedy settings into scratch files and report generated tokens per
second (the model's new tokens, counted with its tokenizer); the ratio is measured in one run (the machine is
shared and noisy). Also checks that the two files hold the same answers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medusa_cache.generate import GenerateConfig, generate

DEMO = Path(__file__).resolve().parents[1] / "medusa_cache" / "demo"


def new_tokens(path: Path, tok) -> int:
    n = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "trained" in r:
            n += sum(r["trained"])
        else:
            n += sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in r["messages"]
                     if m["role"] == "assistant")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO / "stories260K"))
    p.add_argument("--prompts", default=str(DEMO / "heldout_prompts.jsonl"))
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.max_new_tokens = 4, 8
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = Path(a.prompts).read_text().splitlines()[: a.rows]
        (d / "p.jsonl").write_text("\n".join(rows) + "\n")
        (d / "w.jsonl").write_text(rows[0] + "\n")  # warm-up: the first load and run pay one-off costs
        generate(GenerateConfig(model=a.model, prompts=str(d / "w.jsonl"), out=str(d / "w.out"), max_new_tokens=2))
        res = {}
        for name, bs in (("batched", a.batch_size), ("one at a time", 1)):
            t0 = time.perf_counter()
            generate(GenerateConfig(model=a.model, prompts=str(d / "p.jsonl"), out=str(d / f"{bs}.jsonl"),
                                    max_new_tokens=a.max_new_tokens, batch_size=bs))
            dt = time.perf_counter() - t0
            res[name] = (new_tokens(d / f"{bs}.jsonl", tok), dt)
        same = (d / f"{a.batch_size}.jsonl").read_text() == (d / "1.jsonl").read_text()
    print(f"{len(rows)} rows of {a.prompts}, {a.max_new_tokens} new tokens at most, greedy")
    print("| generate | rows per call | new tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for name, bs in (("batched", a.batch_size), ("one at a time", 1)):
        n, dt = res[name]
        print(f"| {name} | {bs} | {n} | {dt:.1f} | {n / dt:.1f} |")
    (nb, tb), (n1, t1) = res["batched"], res["one at a time"]
    print(f"batched / one at a time: {(nb / tb) / (n1 / t1):.2f}x tokens/s; same answers: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
