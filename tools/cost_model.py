"""What a dump and an epoch cost, cached vs online, for the reference models (prints a markdown table).

    python tools/cost_model.py [--tokens 50e6] [--epochs 10] [--compression 1.07] [--int8 2.05] [--needed 0.49]

FLOPs per token: backbone forward = 2 x non-embedding parameters + causal attention 2 x layers x hidden x
context (average context = half the mean length); head training (fwd + bwd) = 6 x heads x (H^2 + H x draft vocab).
Online Medusa-1 training runs the backbone forward in every step of every epoch; the cache runs it once
(the dump) and then reads H x 2 bytes per token per epoch (divided by the measured compression). The second table
gives the cache size for each layout from ratios measured by tools/bench_storage.py part 1: lossless compression
1.07x (stories260K's states with the duplicated prompt rows left out: the 1.38x measured over all rows came from
story openings many sequences share), int8 2.05x below raw bf16 (stories260K), needed rows 0.49 of the tokens
(--keep-rows needed --max-heads 5 on the fixture chats), and what one epoch of streaming costs in reading at a
given loader rate.
"""

from __future__ import annotations

import argparse

MODELS = {  # params, hidden, layers, vocab, draft vocab, tied embeddings
    "Llama-3.1-8B": (8.03e9, 4096, 32, 128256, 32000, False),
    "Qwen2.5-7B": (7.62e9, 3584, 28, 152064, 16000, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=50e6, help="tokens in the data set (ShareGPT 68K: ~50M)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mean-length", type=float, default=700)
    ap.add_argument("--compression", type=float, default=1.07, help="lossless ratio of bf16 states (default: "
                    "measured by tools/bench_storage.py part 1 on stories260K)")
    ap.add_argument("--int8", type=float, default=2.05, help="measured raw bf16 bytes / int8 store bytes")
    ap.add_argument("--needed", type=float, default=0.49, help="measured rows stored / tokens, --keep-rows needed")
    ap.add_argument("--read-tokens-per-s", type=float, default=208e3, help="measured streaming loader rate")
    ap.add_argument("--quick", action="store_true", help="accepted for CI's tool run; the table is arithmetic and "
                    "takes no time either way")
    a = ap.parse_args()
    print(f"Arithmetic, nothing measured by this script: FLOPs from the model shapes; the ratios are inputs (defaults "
          f"measured earlier by tools/bench_storage.py and bench_train.py on this project's machine, override them): "
          f"compression {a.compression}, int8 {a.int8}, needed rows {a.needed}, loader {a.read_tokens_per_s:.0f} "
          "tokens/s.\n")
    print("| model | backbone fwd GFLOP/tok | heads train GFLOP/tok | dump PFLOP | cache size GB | "
          f"online {a.epochs} epochs PFLOP | cached {a.epochs} epochs PFLOP (incl. dump) | each further run: "
          "online / cached PFLOP |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (params, h, layers, vocab, draft, tied) in MODELS.items():
        non_embed = params - vocab * h * (1 if tied else 2)
        fwd = 2 * non_embed + 2 * layers * h * a.mean_length / 2
        heads = 6 * a.heads * (h * h + h * draft)
        n = a.tokens
        dump = fwd * n
        online = a.epochs * (fwd + heads) * n
        cached = dump + a.epochs * heads * n
        size = n * 2 * h / a.compression / 1e9
        rerun = a.epochs * heads * n
        print(f"| {name} | {fwd / 1e9:.1f} | {heads / 1e9:.2f} | {dump / 1e15:.0f} | {size:.0f} | "
              f"{online / 1e15:.0f} | {cached / 1e15:.0f} ({online / cached:.1f}x less) | "
              f"{online / 1e15:.0f} / {rerun / 1e15:.0f} ({(fwd + heads) / heads:.1f}x less) |")
    print(f"\n| model | cache GB: bf16 all rows | bf16 needed rows | int8 all rows | int8 needed rows | "
          f"one epoch read at {a.read_tokens_per_s / 1e3:.0f}K tokens/s (h) |")
    print("|---|---|---|---|---|---|")
    for name, (_, h, _, _, _, _) in MODELS.items():
        raw = a.tokens * 2 * h / 1e9
        gb, q = raw / a.compression, raw / a.int8
        print(f"| {name} | {gb:.0f} | {gb * a.needed:.0f} | {q:.0f} | {q * a.needed:.0f} | "
              f"{a.tokens / a.read_tokens_per_s / 3600:.2f} |")


if __name__ == "__main__":
    main()
