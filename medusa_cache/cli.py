"""The ``medusa-cache`` command: thin subcommands that parse flags, build a config and call a function."""

from __future__ import annotations

import argparse
import json
import sys

from .config import add_config_args, build_config
from .errors import UserError

EPILOG = """examples:
  medusa-cache dump --model MODEL --data chat.json --out cache.zarr --draft-vocab-size 32000
  medusa-cache inspect cache.zarr
  medusa-cache train --cache cache.zarr --out heads/ --config configs/llama3-8B-medusa.json
  medusa-cache export heads/ --format vllm --out heads-vllm/
"""


def _dump(args: argparse.Namespace) -> None:
    from .dump import DumpConfig, print_summary, run_dump

    print_summary(run_dump(build_config(DumpConfig, args)))


def _inspect(args: argparse.Namespace) -> None:
    from .inspect import inspect_store, render

    info = inspect_store(args.store)
    print(json.dumps(info, indent=2) if args.json else render(info))


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    train(build_config(TrainConfig, args, args.config))


def _export(args: argparse.Namespace) -> None:
    from .export import export

    export(args.dir, args.format, args.out, overwrite=args.overwrite)
    print(f"wrote {args.format} heads to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from .dump import DumpConfig
    from .train import TrainConfig

    p = argparse.ArgumentParser(
        prog="medusa-cache",
        description="Run the backbone once into a Zarr cache of hidden states, then train Medusa heads from it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dump", help="run the model once over chat data and write the cache",
                       epilog="example:\n  medusa-cache dump --model M --data a.json b.jsonl --out c.zarr "
                              "--draft-vocab-size 32000 --dtype bfloat16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(d, DumpConfig)
    d.set_defaults(func=_dump)

    i = sub.add_parser("inspect", help="summarise a cache: sizes, counts, fingerprints, progress")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_inspect)

    t = sub.add_parser("train", help="train Medusa heads from a cache (the backbone is never loaded)",
                       epilog="example:\n  medusa-cache train --cache c.zarr --out heads --config "
                              "configs/llama3-8B-medusa.json --epochs 2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="JSON config file mirroring the train flags; explicit flags override it")
    add_config_args(t, TrainConfig)
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write trained heads in a serving layout (vLLM or Medusa reference)")
    e.add_argument("dir", help="output directory of `medusa-cache train`")
    e.add_argument("--format", choices=["vllm", "medusa"], required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"medusa-cache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medusa-cache {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
