"""The ``medusa-cache`` command: thin subcommands that parse flags, build a config and call a function."""

from __future__ import annotations

import argparse
import json
import sys

from .config import add_config_args, build_config
from .errors import Interrupted, UserError

RAW = argparse.RawDescriptionHelpFormatter
EPILOG = """examples:
  medusa-cache dump --model MODEL --data chat.json --out cache.zarr --draft-vocab-size 32000
  medusa-cache inspect cache.zarr
  medusa-cache train --cache cache.zarr --out heads/ --config configs/llama3-8B-medusa.json
  medusa-cache export heads/ --format vllm --out heads-vllm/
"""


def _dump(args: argparse.Namespace) -> None:
    from . import dist
    from .dump import DumpConfig, print_summary, run_dump

    cfg = build_config(DumpConfig, args, args.config)
    dist.set_threads(cfg.threads)
    rank, world, device = dist.setup(cfg.device)
    cfg.device = device
    s = run_dump(cfg, rank, world)
    if rank == 0:
        print_summary(s)


def _inspect(args: argparse.Namespace) -> None:
    from .info import inspect_store, render

    info = inspect_store(args.store, args.coverage)
    print(json.dumps(info, indent=2) if args.json else render(info))


def _verify(args: argparse.Namespace) -> None:
    from .verify import verify

    res = verify(args.store, args.deep, args.model, args.samples, args.allow_partial)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['store']}: {'healthy' if res['healthy'] else 'PROBLEMS'} ({res['units_done']} units"
              f"{', deep' if res['deep'] else ''})")
        for p in res["problems"]:
            print(f"  - {p}")
    if not res["healthy"]:
        raise SystemExit(1)


def _generate(args: argparse.Namespace) -> None:
    from .generate import GenerateConfig, generate

    n = generate(build_config(GenerateConfig, args))
    print(f"{n} rows in {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .dist import set_threads

    set_threads(args.threads)
    run_demo(args.out, args.epochs)


def _train(args: argparse.Namespace) -> None:
    from . import dist
    from .train import TrainConfig, train

    base = None
    if getattr(args, "resume", False) and getattr(args, "out", None):  # --resume alone: the stored settings
        from .rundir import stored_train_config

        base = stored_train_config(args.out)
        if base:
            base = {k: v for k, v in base.items() if k not in ("resume", "overwrite")}
    cfg = build_config(TrainConfig, args, args.config, base=base)
    dist.set_threads(cfg.threads)
    rank, _, cfg.device = dist.setup(cfg.device)
    res = train(cfg)
    if rank == 0:
        from .train import render_summary

        print(render_summary(res))


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .export import export

    base = export(args.dir, args.format, args.out, overwrite=args.overwrite, base_model=args.base_model,
                  safetensors=args.safetensors)
    files = sorted(f for f in Path(args.out).iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {args.format} heads to {args.out}: {', '.join(f.name for f in files)} ({size / 1e6:.1f} MB; "
          f"base_model_name_or_path: {base})")


def _speculate(args: argparse.Namespace) -> None:
    from .dist import set_threads
    from .speculate import SpeculateConfig, render, run_speculate

    cfg = build_config(SpeculateConfig, args)
    set_threads(cfg.threads)
    res = run_speculate(cfg)
    print(json.dumps(res, indent=2) if cfg.json else render(res))
    if cfg.out:
        print(f"results: {cfg.out}/results.json, {cfg.out}/report.md")


def _comma_list(kind: type, what: str):
    """argparse type for comma-separated values, e.g. ``--heads 1,2,3``."""

    def parse(s: str) -> list:
        try:
            out = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        return out

    return parse


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


THREADS_HELP = "CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share"
_ints = _comma_list(int, "integers")
_floats = _comma_list(float, "numbers")


def _eval(args: argparse.Namespace) -> None:
    from .dist import set_threads
    from .evaluate import render_table, run_eval

    set_threads(args.threads)
    base = args.base_model
    res = run_eval(args.heads, args.cache, args.topk, args.tree, args.tree_budget or [], args.trees_out, args.device,
                   base)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(render_table([res], args.tree_budget or []))
    if "tree_acceptance" in res:
        print(f"tree {args.tree}: acceptance {res['tree_acceptance']:.3f}")
    for k in (1, 5, args.topk):
        print(f"top{k} per head: " + " ".join(f"{x:.3f}" for x in res[f"top{k}"]))


def _ablate(args: argparse.Namespace) -> None:
    from . import dist
    from .ablate import run_ablate
    from .train import TrainConfig

    # ablate's own --heads/--layers/--lr are lists; --layers/--lr default to the config file's values
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("heads", "layers", "lr")})
    cfg = build_config(TrainConfig, rest, args.config)
    layers, lrs = args.layers or [cfg.num_layers], args.lr or [cfg.lr]
    cfg = build_config(TrainConfig, rest, args.config, num_heads=max(args.heads), num_layers=max(layers),
                       lr=max(lrs))
    dist.set_threads(cfg.threads)
    _, _, cfg.device = dist.setup(cfg.device)
    run_ablate(cfg, args.heads, layers, lrs, args.tree_budget, args.topk, args.verify_cost, args.speculate_prompts,
               args.speculate_tokens, args.draft_vocab)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (``-h`` still shows the full usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:  # long by nature: one declaration per subcommand, read top to bottom
    from .dump import DumpConfig
    from .generate import GenerateConfig
    from .train import TrainConfig

    p = _Parser(
        prog="medusa-cache",
        description="Run the backbone once into a Zarr cache of hidden states, then train Medusa heads from it.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"medusa-cache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dump", help="run the model once over chat data and write the cache",
                       epilog="example:\n  medusa-cache dump --model M --data a.json b.jsonl --out c.zarr "
                              "--draft-vocab-size 32000 --dtype bfloat16",
                       formatter_class=RAW)
    d.add_argument("--config", help="JSON config file mirroring the dump flags; explicit flags override it")
    add_config_args(d, DumpConfig)
    d.set_defaults(func=_dump)

    i = sub.add_parser("inspect", help="summarise a cache: sizes, counts, fingerprints, progress",
                       epilog="example:\n  medusa-cache inspect cache.zarr --json | head", formatter_class=RAW)
    i.add_argument("store", help="the cache store (a directory or an fsspec URL)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--coverage", type=_ints, metavar="SIZES",
                   help="draft vocabulary sizes whose coverage of the assistant tokens to show (default: "
                        "1000,4000,8000,16000,32000)")
    i.set_defaults(func=_inspect)

    vf = sub.add_parser("verify", help="check a cache: layout, labels, mapping, progress; --deep decodes all data",
                        epilog="example:\n  medusa-cache verify cache.zarr --deep --model PATH/TO/MODEL --samples 8",
                        formatter_class=RAW)
    vf.add_argument("store", help="the cache store (a directory or an fsspec URL)")
    vf.add_argument("--deep", action="store_true", help="decode every chunk and look for NaN/Inf")
    vf.add_argument("--model", help="recompute a few random sequences with this model and compare")
    vf.add_argument("--samples", type=_positive, default=4, help="sequences recomputed with --model (default: 4)")
    vf.add_argument("--allow-partial", action="store_true",
                    help="accept an incomplete store (a dump still running or killed) as healthy")
    vf.add_argument("--json", action="store_true", help="print JSON")
    vf.set_defaults(func=_verify)

    t = sub.add_parser("train", help="train Medusa heads from a cache (the backbone is never loaded)",
                       epilog="example:\n  medusa-cache train --cache c.zarr --out heads --config "
                              "configs/llama3-8B-medusa.json --epochs 2",
                       formatter_class=RAW)
    t.add_argument("--config", help="JSON config file mirroring the train flags; explicit flags override it")
    add_config_args(t, TrainConfig)
    t.set_defaults(func=_train)

    v = sub.add_parser("eval", help="per-head accuracy and acceptance length (chain and tree) on a cache",
                       epilog="example:\n  medusa-cache eval --heads heads --cache heldout.zarr --tree-budget 16,32,64 "
                              "--trees-out trees", formatter_class=RAW)
    v.add_argument("--heads", required=True, help="heads directory written by train")
    v.add_argument("--cache", required=True, help="store to evaluate on (ideally held out)")
    v.add_argument("--topk", type=_positive, default=10, help="top-k predictions considered per head (default: 10)")
    g = v.add_mutually_exclusive_group()
    g.add_argument("--tree", help="JSON file with a Medusa tree: a list of paths of top-k indices")
    g.add_argument("--tree-budget", type=_ints, help="fit trees of these node counts, e.g. 16,32,64")
    v.add_argument("--base-model", metavar="MODEL",
                   help="score against this base model's own greedy tokens (from the cached states and its lm_head) "
                        "instead of the data's tokens")
    v.add_argument("--trees-out", help="directory to write the fitted trees (tree_N.json)")
    v.add_argument("--device", default="cpu", help="device for the heads: cpu, cuda or cuda:N (default: cpu)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.add_argument("--threads", type=_positive, help=THREADS_HELP)
    v.set_defaults(func=_eval)

    a = sub.add_parser("ablate", help="train and evaluate several head counts / layers / lrs in one pass",
                       epilog="example:\n  medusa-cache ablate --cache c.zarr --out abl --heads 1,2,3,4,5 "
                              "--layers 1,2 --tree-budget 16,32,64 --epochs 2",
                       formatter_class=RAW)
    a.add_argument("--heads", type=_ints, default=[1, 2, 3, 4, 5], help="head counts (default: 1,2,3,4,5)")
    a.add_argument("--layers", type=_ints, help="ResBlocks per head (default: the config's num_layers, else 1)")
    a.add_argument("--lr", type=_floats, help="learning rates (default: the config's lr, else 1e-4)")
    a.add_argument("--tree-budget", type=_ints, default=[16, 32, 64], help="tree sizes (default: 16,32,64)")
    a.add_argument("--draft-vocab", type=_ints, metavar="SIZES",
                   help="draft vocabulary sizes to sweep, e.g. 8000,16000,32000: each re-mapped from this one cache "
                        "(train --draft-vocab-size), every size x head count in one report (default: the cache's)")
    a.add_argument("--topk", type=_positive, default=10,
                   help="top-k predictions per head considered for trees (default: 10)")
    a.add_argument("--verify-cost", type=float,
                   help="cost of verifying one tree node relative to a one-token step, for the cost-aware choice of "
                        "the best (default: measured by --speculate-prompts, else timed with the cache's model on "
                        "--device)")
    a.add_argument("--speculate-prompts",
                   help="prompts file: also decode for real (speculate) with each head count's best tree and report "
                        "measured tokens per step and speedup")
    a.add_argument("--speculate-tokens", type=_positive, default=128,
                   help="new tokens per prompt for --speculate-prompts")
    a.add_argument("--config", help="JSON train config; explicit flags override it")
    add_config_args(a, TrainConfig, skip=("num_heads", "num_layers", "lr", "clip_per_head"))
    a.set_defaults(func=_ablate)

    sp = sub.add_parser("speculate", help="real Medusa decoding with trained heads, checked against greedy decoding",
                        epilog="example:\n  medusa-cache speculate --model M --heads heads --prompts p.jsonl "
                               "--tree trees/tree_32.json --max-new-tokens 128 --out spec",
                        formatter_class=RAW)
    from .speculate import SpeculateConfig

    add_config_args(sp, SpeculateConfig)
    sp.set_defaults(func=_speculate)

    gn = sub.add_parser("generate", help="self-distilled data: the base model's own continuations / assistant turns",
                        epilog="example:\n  medusa-cache generate --model PATH/TO/MODEL --prompts prompts.jsonl "
                               "--out self.jsonl --max-new-tokens 256", formatter_class=RAW)
    add_config_args(gn, GenerateConfig)
    gn.set_defaults(func=_generate)

    dm = sub.add_parser("demo", help="generate -> dump -> ablate -> speculate on the bundled stories260K, offline, CPU",
                        epilog="example:\n  medusa-cache demo --out /tmp/demo --epochs 4", formatter_class=RAW)
    dm.add_argument("--out", default="medusa-cache-demo", help="working directory (default: medusa-cache-demo)")
    dm.add_argument("--epochs", type=_positive, default=4, help="training epochs (default: 4)")
    dm.add_argument("--threads", type=_positive, help=THREADS_HELP)
    dm.set_defaults(func=_demo)

    e = sub.add_parser("export", help="write trained heads in a serving layout (vLLM or Medusa reference)",
                       epilog="example:\n  medusa-cache export heads --format vllm --out heads-vllm "
                              "--base-model meta-llama/Llama-3.1-8B-Instruct", formatter_class=RAW)
    e.add_argument("dir", help="output directory of `medusa-cache train` (or ablate's best/)")
    e.add_argument("--format", choices=["vllm", "medusa"], required=True,
                   help="vllm: vLLM's Medusa layout; medusa: the FasterDecoding/Medusa reference layout")
    e.add_argument("--out", required=True, help="directory to write (created)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only a directory medusa-cache wrote, never an input)")
    e.add_argument("--base-model", help="base_model_name_or_path to write (default: the model path used at dump time)")
    e.add_argument("--safetensors", action="store_true",
                   help="--format medusa: also write medusa_lm_head.safetensors (the reference loader reads only "
                        "medusa_lm_head.pt; each file holds full-vocabulary rows)")
    e.set_defaults(func=_export)
    return p


def library_failure(e: BaseException) -> str | None:
    """One line for a failure of a library on bad input (a path, a template, a store, a credential), naming the
    thing and what to do; None for anything else (a bug: its traceback is kept)."""
    name, module = type(e).__name__, type(e).__module__
    if module.startswith("jinja2"):
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        return (f"the chat template does not render: {name}: {e}{where}; fix --chat-template or the tokenizer's "
                "chat_template")
    if isinstance(e, ModuleNotFoundError) and e.name in ("s3fs", "gcsfs", "adlfs"):
        return f"this store URL needs the {e.name} package: pip install 'medusa-cache[s3]' (or {e.name})"
    if module.startswith(("botocore", "aiobotocore")):
        hint = "set AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)" if "Credentials" in name \
            else "check the bucket name, the endpoint (AWS_ENDPOINT_URL) and your permissions"
        return f"object storage: {name}: {e}; {hint}"
    if module.startswith("zarr") or (isinstance(e, json.JSONDecodeError) and "zarr" in str(e.doc)[:200]):
        return f"the store's Zarr metadata cannot be read ({name}: {e}); the store is damaged: re-dump it"
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return f"{e.filename}: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"medusa-cache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `medusa-cache inspect STORE | head`: the reader left; stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Interrupted as e:
        print(f"medusa-cache {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"medusa-cache {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from . import dist

        message = library_failure(e)  # expected failures of the libraries become one line; bugs stay tracebacks
        if message is not None and not dist.active():
            print(f"medusa-cache {args.command}: error: {message}", file=sys.stderr)
            return 2
        if not dist.active():
            raise
        # one failed rank must not leave the others waiting in a collective: leave now, without teardown
        import os
        import traceback

        traceback.print_exc()
        print(f"medusa-cache {args.command}: error: rank {dist.rank()}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
