"""Where the gap between teacher-forced acceptance and measured decoding comes from (stories260K demo heads).

On the demo's held-out openings, the model's own greedy continuations are cached and ranked (as `eval` does);
then three numbers for the same tree: the position-averaged acceptance `eval` reports, the decoding walk over the
same ranks (what real decoding visits), and `speculate`'s measured tokens per step. The walk equals speculate
exactly (tests/test_speculate.py); the first differs from it because decoding skips the positions it accepted.

    python tools/acceptance_gap.py [--demo medusa-cache-demo] [--max-new-tokens 128]
    python tools/acceptance_gap.py --quick     # seconds: a small demo (tools/quick.py), what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from medusa_cache.demo import DEMO  # noqa: E402
from medusa_cache.evaluate import decoding_walk, head_ranks, tree_acceptance, validate_tree  # noqa: E402
from medusa_cache.headsdir import load_heads  # noqa: E402
from medusa_cache.speculate import cache_greedy_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="medusa-cache-demo")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="a small demo built in seconds (tools/quick.py)")
    args = ap.parse_args()
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        args.demo, args.max_new_tokens = str(quick_demo()), 32
    abl = Path(args.demo) / "ablate"
    best = json.loads((abl / "results.json").read_text())["best"]
    heads, mapping, _ = load_heads(abl / "best")
    model_dir = DEMO / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = cache_greedy_text(model, tok, str(DEMO / "heldout_prompts.jsonl"), args.max_new_tokens,
                          Path(tempfile.mkdtemp()) / "c.zarr", mapping)
    offsets = c.offsets
    r = head_ranks(heads, c, np.arange(c.n_seqs), topk=10)
    print("| tree | position-averaged (eval) | decoding walk (= speculate) | walk without the prefill step |")
    print("|---|---|---|---|")
    for n in (16, 32, 64):
        tree = validate_tree(json.loads((abl / "trees" / f"{best['variant']}_heads{best['num_heads']}_tree_{n}.json")
                                        .read_text()), heads.num_heads)
        walks = [decoding_walk(r["rank"][r["seq"] == s], tree, args.max_new_tokens) for s in range(len(offsets) - 1)]
        tokens, steps = sum(w[0] for w in walks), sum(w[1] for w in walks)
        print(f"| tree{n} | {tree_acceptance(r['rank'], tree):.3f} | {tokens / steps:.3f} | "
              f"{(tokens - len(walks)) / (steps - len(walks)):.3f} |")


if __name__ == "__main__":
    main()
