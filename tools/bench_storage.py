"""Storage: bytes per token on disk, int8 reconstruction error, what int8 does to the heads, and read speed.

    python tools/bench_storage.py [--demo medusa-cache-demo] [--fixtures ../shared/fixtures] [--read-tokens 100000]
    python tools/bench_storage.py --quick     # seconds: small demo, 8 rows per chat file, 3000 tokens (CI)

1. Bytes/token of `hidden` (+ scales, + row_kept) for lossless bf16 and int8, every row and only the needed rows
   (`--keep-rows needed --max-heads 5`), on the fixture chat files
   through a tiny random Llama (hidden 512) with the Llama-3 tokenizer, and on the stories260K demo data.
2. int8 reconstruction error (relative L2, worst channel's max abs error over the channel's absmax) on stories260K
   states and on a synthetic distribution with a few channels 10-100x larger than the rest.
3. Heads trained on the bf16 cache and on the int8 cache of the demo data (same seed and steps): held-out top-1
   per head and chain acceptance, both scored on the bf16 states.
4. Read speed at H=4096: tokens/s of the streaming loader alone (no training) per layout, against the same
   states saved as one torch.save file per sequence (SpecForge's offline layout), and the cores that would feed an
   H200 training the Llama-3 reference heads (~225K tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medusa_cache import store  # noqa: E402
from medusa_cache.demo import DEMO  # noqa: E402
from medusa_cache.dump import DumpConfig, run_dump  # noqa: E402
from medusa_cache.loader import epoch_order, make_batches, make_blocks  # noqa: E402
from medusa_cache.stream import BatchStream, StreamSource  # noqa: E402
from medusa_cache.vocab import VocabMapping  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def hidden_bytes(path: Path) -> int:
    return sum(f.stat().st_size for name in ("hidden", "hidden_scale", "row_kept") if (path / name).exists()
               for f in (path / name).rglob("*") if f.is_file())


def tiny_llama(work: Path, tok_dir: Path) -> Path:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = work / "llama512"
    LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                                 tie_word_embeddings=False)).save_pretrained(m)
    for f in tok_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.startswith("LICENSE"):
            shutil.copy(f, m / f.name)
    return m


def sizes(work: Path, name: str, model: Path, data: list[str], **kw) -> list[str]:
    rows = []
    for codec, keep in (("lossless", "all"), ("lossless", "needed"), ("int8", "all"), ("int8", "needed")):
        out = work / f"{name}-{codec}{'' if keep == 'all' else '-needed'}"
        run_dump(DumpConfig(model=str(model), data=data, out=str(out), dtype="bfloat16", hidden_codec=codec,
                            keep_rows=keep, max_heads=5, **kw))
        c = store.Cache(out)
        rows.append((f"{codec}, {keep} rows", hidden_bytes(out) / c.n_tokens, c.hidden_size, c.n_rows / c.n_tokens))
    raw = 2 * rows[0][2]
    return [f"| {name} (H {h}) | {codec} | {frac:.2f} | {b:.0f} | {raw / b:.2f}x | {rows[0][1] / b:.2f}x |"
            for codec, b, h, frac in rows]


def int8_error(x: torch.Tensor, group: int) -> tuple[float, float]:
    q, s = store.int8_encode(x, group)
    y = store.int8_decode(q, s, group)
    rel = float((y - x).norm() / x.norm())
    worst = float(((y - x).abs().amax(0) / x.abs().amax(0).clamp_min(1e-12)).max())
    return rel, worst


def heads_comparison(demo: Path, work: Path, epochs: int = 4) -> list[str]:
    from medusa_cache.acceptance import chain_acceptance
    from medusa_cache.evaluate import head_ranks, topk_accuracy
    from medusa_cache.headsdir import load_heads
    from medusa_cache.train import TrainConfig, split, train

    stories = demo / "stories.jsonl"
    out = []
    for codec in ("lossless", "int8"):
        run_dump(DumpConfig(model=str(DEMO / "stories260K"), data=[str(stories)], out=str(work / f"demo-{codec}"),
                            dtype="bfloat16", hidden_codec=codec, int8_group=16, max_length=512))
        train(TrainConfig(cache=str(work / f"demo-{codec}"), out=str(work / f"h-{codec}"), num_heads=5, epochs=epochs,
                          lr=3e-3, batch_tokens=1024, grad_accum=1, val_fraction=0.1, seed=0))
    ref = store.Cache(work / "demo-lossless")
    _, val = split(ref, TrainConfig(cache="x", out="y", val_fraction=0.1, seed=0))
    for codec in ("lossless", "int8"):
        heads, _, _ = load_heads(work / f"h-{codec}")
        r = head_ranks(heads, ref, val)
        top1 = topk_accuracy(r["rank"], r["has_target"], (1,))[1]
        out.append(f"| {'bf16' if codec == 'lossless' else 'int8 (group 16)'} | {' '.join(f'{x:.4f}' for x in top1)} "
                   f"| {chain_acceptance(r['rank']):.4f} |")
    return out


def synthetic(path: Path, n: int, hidden: int, codec: str, compression: str = "zstd") -> None:
    rng = np.random.default_rng(0)
    lens = rng.integers(200, 1200, n // 300 + 10)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    offsets = offsets[offsets <= n]
    m = int(offsets[-1])
    g = torch.Generator().manual_seed(0)
    store.from_arrays(path, torch.randn(m, hidden, generator=g).to(torch.bfloat16), offsets, rng.integers(0, 1000, m),
                      VocabMapping(np.zeros(1000, np.int64), np.ones(1000, bool)), hidden_dtype="bfloat16",
                      layout=store.Layout.default(hidden, 2, 2048), hidden_codec=codec,
                      hidden_compression=compression)  # the layout `dump` picks for H at --max-length 2048


def loader_tps(path: Path, threads: int, direct: bool = True) -> float:
    """Tokens/s delivered by the streaming loader alone (int8: packed rows, decoded later on the device)."""
    torch.set_num_threads(threads)
    c = store.Cache(path, direct=direct)
    seqs = np.arange(c.n_seqs)
    blocks = make_blocks(seqs, c.offsets, 16384)
    batches = make_batches(epoch_order(blocks, 0, 0, 64), c.offsets, 1, 4096)
    labels = c.array("labels")
    t0, n = time.perf_counter(), 0
    for b in BatchStream(StreamSource(c, labels, 4, blocks, packed=c.codec == "int8"), batches, prefetch=8):
        n += len(b.hidden)
    return n / (time.perf_counter() - t0)


def per_sample_tps(path: Path) -> tuple[float, float]:
    c = store.Cache(path)
    d = path.parent / "per-sample"
    d.mkdir(exist_ok=True)
    for s in range(c.n_seqs):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        torch.save({"hidden_state": c.read_hidden(a, b).to(torch.bfloat16).clone()}, d / f"{s}.pt")
    size = sum(f.stat().st_size for f in d.iterdir())
    t0 = time.perf_counter()
    for s in np.random.default_rng(0).permutation(c.n_seqs):
        torch.load(d / f"{s}.pt", weights_only=True)
    return c.n_tokens / (time.perf_counter() - t0), size / c.n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="medusa-cache-demo", help="output of `medusa-cache demo` (its stories)")
    ap.add_argument("--fixtures", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--read-tokens", type=int, default=100000)
    ap.add_argument("--only-read", action="store_true", help="only part 4")
    ap.add_argument("--quick", action="store_true", help="small demo, 8 rows per chat file, 3000 tokens (CI)")
    a = ap.parse_args()
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        a.demo, a.read_tokens = str(quick_demo()), 3000
    work = Path(tempfile.mkdtemp())
    fx = Path(a.fixtures)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quick import tokenizer_dir

    tok = tokenizer_dir(fx / "tokenizers" / "llama3")
    if a.only_read:
        return read_speed(work, a)
    print("## 1. Bytes per token of the hidden states (bf16 uncompressed = 2 x H)\n")
    print("| data | layout (needed rows: --max-heads 5) | rows stored / tokens | bytes/token | vs raw bf16 | "
          "vs lossless bf16 all rows |\n|---|---|---|---|---|---|")
    chats = [str(fx / "chat" / f) for f in ("fastchat_dummy_sharegpt.json", "glaive_toolcall_sharegpt.json")]
    if a.quick:  # the first 8 conversations of each file
        for i, f in enumerate(chats):
            (work / f"chat{i}.json").write_text(json.dumps(json.loads(Path(f).read_text())[:8]))
            chats[i] = str(work / f"chat{i}.json")
    for row in sizes(work, "fixture chats, Llama-3 tokenizer", tiny_llama(work, tok), chats, max_length=2048,
                     draft_vocab_size=32000, pipeline="specforge", int8_group=128):
        print(row)
    for row in sizes(work, "stories260K demo", DEMO / "stories260K", [str(Path(a.demo) / "stories.jsonl")],
                     max_length=512, int8_group=16):
        print(row)
    print("\n## 2. int8 reconstruction error (relative L2; worst channel: max abs error / channel absmax)\n")
    print("| states | group | relative L2 | worst channel |\n|---|---|---|---|")
    demo_states = store.Cache(work / "stories260K demo-lossless")
    st = demo_states.read_hidden(0, min(20000, demo_states.n_tokens)).float()
    for g in (16, 32, 64):
        rel, worst = int8_error(st, g)
        print(f"| stories260K (H 64) | {g} | {rel:.4f} | {worst:.4f} |")
    torch.manual_seed(0)
    x = torch.randn(20000, 4096)
    x[:, torch.randperm(4096)[:8]] *= torch.logspace(1, 2, 8)  # 8 channels 10-100x larger
    for g in (64, 128, 4096):
        rel, worst = int8_error(x, g)
        print(f"| synthetic H 4096, 8 outlier channels 10-100x | {g} | {rel:.4f} | {worst:.4f} |")
    print("\n## 3. Heads trained on bf16 vs int8 states (demo data, same seed and steps; scored on bf16 states)\n")
    print("| cache | top-1 per head | chain acceptance |\n|---|---|---|")
    for row in heads_comparison(Path(a.demo), work, 1 if a.quick else 4):
        print(row)
    read_speed(work, a)


def _synthetic_once(work: Path, a, codec: str, comp: str) -> Path:
    p = work / f"read-{codec}-{comp}"
    if not p.exists():
        synthetic(p, a.read_tokens, 4096, codec, comp)
    return p


def read_speed(work: Path, a) -> None:
    print(f"\n## 4. Read speed at H 4096 ({a.read_tokens} tokens, streaming loader alone, warm page cache)\n")
    per_sample_tps(_synthetic_once(work, a, "lossless", "zstd"))  # writes the files and warms the page cache
    tps, b = per_sample_tps(work / "read-lossless-zstd")
    print(f"torch.save per sequence (SpecForge offline): {b:.0f} bytes/token, {tps:.0f} tokens/s "
          f"({tps * 8192 / 1e9:.2f} GB/s of bf16)\n")
    print("| layout | bytes/token | read by | tokens/s, 1 thread | tokens/s, 2 threads | 2 threads / per-sample |")
    print("|---|---|---|---|---|---|")
    for codec, comp in (("lossless", "zstd"), ("lossless", "lz4"), ("lossless", "none"), ("int8", "zstd"),
                        ("int8", "none")):
        p = _synthetic_once(work, a, codec, comp)
        loader_tps(p, 2)  # warm the page cache
        for direct in (False, True):
            t1, t2 = loader_tps(p, 1, direct), loader_tps(p, 2, direct)
            print(f"| {codec}, {comp} | {hidden_bytes(p) / store.Cache(p).n_tokens:.0f} | "
                  f"{'shard files (default)' if direct else 'zarr'} | {t1:.0f} | {t2:.0f} | {t2 / tps:.2f} |")
    tps2, _ = per_sample_tps(work / "read-lossless-zstd")
    print(f"\nper-sample again at the end: {tps2:.0f} tokens/s (the machine's drift over the run)")
    print("\nCores to feed ~225K tokens/s (H200, Llama-3 reference heads), at the 2-thread rate of each layout: "
          "225000 / (tokens/s per 2 cores) x 2.")


if __name__ == "__main__":
    main()
