"""The CUDA paths, run once on a GPU machine: correctness first, then the numbers that need a GPU.

    python tools/gpu_check.py [--out DIR] [--tokens 262144]     # prints one JSON line per check
    python tools/gpu_check.py --quick     # every check on small sizes, on the CPU without a GPU (what CI runs)

1. dump on CUDA (stories260K, float32) and `verify --deep --model` recomputing sequences on the CPU;
2. train on CUDA from that cache, then `speculate --device cuda` (chain and a tree): identical to greedy decoding;
3. `train --distill`, `eval --base-model` and `ablate` on CUDA; torchrun with one process (NCCL, `set_device`);
4. the training step at the Llama-3 reference head size (H 4096, draft 32000, 4 heads, bf16 autocast): `train` in
   memory and streaming, lossless bf16 and int8 (rows decoded on the GPU), each against a bare loop over the same
   rows (cross-entropy with ignore_index and a fused AdamW step, nothing else), all measured in this run;
5. the streaming loader alone at H 4096 on this machine's cores (tools/bench_storage.py part 4).
Each check reports its own error and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def report(name: str, fn) -> bool:
    t0 = time.perf_counter()
    try:
        res = fn()
        print(json.dumps({"check": name, "ok": True, "seconds": round(time.perf_counter() - t0, 1), **(res or {})}),
              flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - report and go on
        print(json.dumps({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                          "trace": traceback.format_exc()[-1500:]}), flush=True)
        return False


def cli(*args: str, timeout: int = 300) -> str:
    p = subprocess.run([sys.executable, "-m", "medusa_cache", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode:
        raise RuntimeError(f"medusa-cache {args[0]} exited {p.returncode}: {p.stderr[-1500:]}")
    return p.stdout


def stories_path(out: Path, device: str) -> dict:
    from medusa_cache.demo import DEMO

    model = str(DEMO / "stories260K")
    cli("generate", "--model", model, "--prompts", str(DEMO / "prompts.jsonl"), "--out", str(out / "stories.jsonl"),
        "--max-new-tokens", "96", "--device", device, "--overwrite")
    cli("dump", "--model", model, "--data", str(out / "stories.jsonl"), "--out", str(out / "cache"), "--dtype",
        "float32", "--max-length", "512", "--device", device, "--overwrite")
    v = json.loads(cli("verify", str(out / "cache"), "--deep", "--model", model, "--json"))
    if not v["healthy"]:
        raise RuntimeError(f"verify: {v['problems']}")
    return {"verify_healthy": v["healthy"]}


def stories_speculate(out: Path, device: str) -> dict:
    from medusa_cache.demo import DEMO

    model = str(DEMO / "stories260K")
    cli("train", "--cache", str(out / "cache"), "--out", str(out / "heads"), "--num-heads", "4", "--epochs", "3",
        "--lr", "3e-3", "--batch-tokens", "1024", "--grad-accum", "1", "--init-from-lm-head", model, "--device",
        device, "--overwrite")
    res = {}
    (out / "tree.json").write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]))
    for name, extra in (("chain", ["--chain"]), ("tree7", ["--tree", str(out / "tree.json")])):
        s = json.loads(cli("speculate", "--model", model, "--heads", str(out / "heads"), "--prompts",
                           str(DEMO / "heldout_prompts.jsonl"), "--max-new-tokens", "96", "--device", device, "--json",
                           *extra))
        res[name] = {"tokens_per_step": s["tokens_per_step"], "identical_to_greedy": s["identical_to_greedy"],
                     "speedup": s.get("speedup")}
        if not s["identical_to_greedy"]:
            raise RuntimeError(f"{name}: output differs from greedy decoding: {s.get('mismatches')}")
    return res


def more_commands(out: Path, device: str) -> dict:
    """train --distill, eval --base-model and ablate on the device, from check 1's cache."""
    from medusa_cache.demo import DEMO

    model = str(DEMO / "stories260K")
    cli("train", "--cache", str(out / "cache"), "--out", str(out / "distill"), "--num-heads", "3", "--epochs", "3",
        "--lr", "3e-3", "--batch-tokens", "256", "--distill", model, "--device", device, "--overwrite")
    ev = json.loads(cli("eval", "--heads", str(out / "distill"), "--cache", str(out / "cache"), "--base-model", model,
                        "--device", device, "--json"))
    cli("ablate", "--cache", str(out / "cache"), "--out", str(out / "ablate"), "--heads", "1,3", "--epochs", "1",
        "--lr", "3e-3", "--batch-tokens", "1024", "--val-fraction", "0.1", "--device", device, "--overwrite")
    res = json.loads((out / "ablate" / "results.json").read_text())
    return {"eval_base_top1": ev.get("top1"), "ablate_best": res.get("best", {}).get("num_heads")}


def torchrun_one(out: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "medusa_cache",
           "train", "--cache", str(out / "cache"), "--out", str(out / "ddp"), "--num-heads", "2", "--max-steps", "5",
           "--batch-tokens", "512", "--device", device, "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode:
        raise RuntimeError(p.stderr[-1500:])
    return {"heads_written": (out / "ddp" / "medusa_lm_head.safetensors").exists()}


def bare_loop(hidden, targets, heads, steps: int, batch: int, device: str) -> float:
    """Tokens/s of the plainest step over the same rows: CE with ignore_index per head, fused AdamW, bf16 autocast."""
    import torch
    import torch.nn.functional as F

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-4, fused=cuda or None)
    perm = torch.randperm(len(hidden))
    hidden, targets = hidden.to(device), targets.to(device)
    t0 = None
    for s in range(steps + 3):
        if s == 3:
            sync()
            t0 = time.perf_counter()
        ix = perm[(s * batch) % (len(perm) - batch):][:batch].to(device)
        h, tg = hidden[ix], targets[ix]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = sum(F.cross_entropy(lo.float(), tg[:, i], ignore_index=-100) for i, lo in enumerate(heads(h)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return steps * batch / (time.perf_counter() - t0)


def step_ratios(out: Path, tokens: int, device: str = "cuda") -> dict:
    import numpy as np
    import torch

    from medusa_cache import store
    from medusa_cache.heads import MedusaHeads
    from medusa_cache.loader import all_targets
    from medusa_cache.train import TrainConfig, train
    from medusa_cache.vocab import VocabMapping

    H, D, K = (4096, 32000, 4) if device.startswith("cuda") else (64, 500, 4)  # cpu: a dry run
    rng = np.random.default_rng(0)
    lens = rng.integers(300, 1500, tokens // 300 + 10)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    offsets = offsets[offsets <= tokens]
    n = int(offsets[-1])
    labels = np.where((np.arange(n) // 200) % 2 == 1, rng.integers(0, D, n), -100)  # half the rows are assistant
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).to(torch.bfloat16)
    mapping = VocabMapping(np.zeros(D, np.int64), np.ones(D, bool))
    res = {"tokens": n}
    for codec in ("lossless", "int8"):
        p = out / f"ref-{codec}"
        if not p.exists():
            store.from_arrays(p, hidden, offsets, labels, mapping, hidden_dtype="bfloat16", hidden_codec=codec,
                              int8_group=64, layout=store.Layout(256, 16384))
        for mode, extra in (("memory", {"in_memory": True}), ("stream", {})):
            o = out / f"train-{codec}-{mode}"
            train(TrainConfig(cache=str(p), out=str(o), num_heads=K, epochs=1, lr=1e-4, batch_tokens=4096,
                              grad_accum=1, val_fraction=0, device=device, log_every=2, overwrite=True,
                              mix_tokens=65536, **extra))
            recs = [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]  # the first window holds warm-up
            res[f"train_{codec}_{mode}_tokens_per_s"] = round(float(np.median(tps)), 0) if tps else None
    heads = MedusaHeads(H, D, K, 1, 0).to(device)
    tg = torch.from_numpy(all_targets(labels, offsets, K))
    keep = (tg != -100).any(1)  # the bare loop, like --mix positions, draws trainable rows
    hid = hidden[keep] if device.startswith("cuda") else hidden[keep].float()
    res["bare_tokens_per_s"] = round(bare_loop(hid, tg[keep], heads, 40, 4096, device), 0)
    for k in [k for k in res if k.startswith("train_") and res[k]]:
        res[k.replace("tokens_per_s", "over_bare")] = round(res[k] / res["bare_tokens_per_s"], 3)
    return res


def loader_alone(out: Path, tokens: int) -> dict:
    import bench_storage as bs
    import torch

    from medusa_cache import store

    res = {"cores": os.cpu_count()}
    work = out / "read"
    work.mkdir(exist_ok=True)
    for codec, comp in (("lossless", "zstd"), ("lossless", "none"), ("int8", "zstd")):
        p = work / f"read-{codec}-{comp}"
        if not p.exists():
            bs.synthetic(p, tokens, 4096, codec, comp)
        bs.loader_tps(p, 4)
        for direct in (False, True):
            for threads in (1, 4):
                res[f"{codec}-{comp}-{'direct' if direct else 'zarr'}-{threads}t"] = round(
                    bs.loader_tps(p, threads, direct), 0)
        res[f"{codec}-{comp}-bytes_per_token"] = round(bs.hidden_bytes(p) / store.Cache(p).n_tokens, 0)
    bs.per_sample_tps(work / "read-lossless-zstd")
    res["per_sample_torch_save"] = round(bs.per_sample_tps(work / "read-lossless-zstd")[0], 0)
    torch.set_num_threads(os.cpu_count())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gpu_check")
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--read-tokens", type=int, default=65536)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of checks 1-3 on a machine without a GPU")
    ap.add_argument("--quick", action="store_true", help="small sizes; on the CPU when there is no GPU (CI)")
    a = ap.parse_args()
    import torch

    if a.quick:
        a.tokens, a.read_tokens = 8192, 4096
        a.device = a.device if torch.cuda.is_available() else "cpu"

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
    d = a.device
    checks = [("dump_verify", lambda: stories_path(out, d)), ("speculate", lambda: stories_speculate(out, d)),
              ("more", lambda: more_commands(out, d)), ("torchrun", lambda: torchrun_one(out, d)),
              ("step", lambda: step_ratios(out, a.tokens, d)),
              ("loader", lambda: loader_alone(out, a.read_tokens))]
    failed = [name for name, fn in checks if (a.only is None or name in a.only) and not report(name, fn)]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
