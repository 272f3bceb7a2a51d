"""The ``medusa-cache`` command: thin subcommands that parse flags, build a config and call a function."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import add_config_args, build_config
from .errors import Interrupted, UserError

RAW = argparse.RawDescriptionHelpFormatter
EPILOG = """examples:
  medusa-cache dump --model MODEL --data chat.json --out cache.zarr --draft-vocab-size 32000
  medusa-cache inspect cache.zarr
  medusa-cache train --cache cache.zarr --out heads/ --config configs/llama3-8B-medusa.json
  medusa-cache export heads/ --format vllm --out heads-vllm/
"""


def _dump(cfg) -> None:
    from . import dist
    from .dump import print_summary, run_dump

    dist.set_threads(cfg.threads)
    rank, world, cfg.device = dist.setup(cfg.device)
    s = run_dump(cfg, rank, world)
    if rank == 0:
        print_summary(s)


def _inspect(cfg) -> None:
    from .info import inspect_store, render

    info = inspect_store(cfg.store, cfg.coverage)
    print(json.dumps(info, indent=2) if cfg.json else render(info))


def _verify(cfg) -> None:
    from .verify import verify

    res = verify(cfg.store, cfg.deep, cfg.model, cfg.samples, cfg.allow_partial)
    if cfg.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['store']}: {'healthy' if res['healthy'] else 'PROBLEMS'} ({res['units_done']} units; "
              f"checked: {res['checked']})")
        for p in res["problems"]:
            print(f"  - {p}")
    if not res["healthy"]:
        raise SystemExit(1)


def _generate(cfg) -> None:
    from .generate import generate

    print(f"{generate(cfg)} rows in {cfg.out}")


def _demo(cfg) -> None:
    from .demo import run_demo
    from .dist import set_threads

    set_threads(cfg.threads)
    run_demo(cfg)


def _train_base(args: argparse.Namespace) -> dict | None:
    """``train --resume --out DIR`` alone: the stored settings are the base the flags override."""
    if not (getattr(args, "resume", False) and getattr(args, "out", None)):
        return None
    from .checkpoint import stored_train_config

    base = stored_train_config(args.out)
    return {k: v for k, v in base.items() if k not in ("resume", "overwrite")} if base else None


def _train(cfg) -> None:
    from . import dist
    from .train import render_summary, train

    dist.set_threads(cfg.threads)
    rank, _, cfg.device = dist.setup(cfg.device)
    res = train(cfg)
    if rank == 0:
        print(render_summary(res))


def _import(cfg) -> None:
    from .importer import run_import

    s = run_import(cfg)
    print(f"imported {s['sequences']} sequences, {s['tokens']:,} tokens ({s['skipped']} samples skipped) into "
          f"{s['store']}\nnext: medusa-cache verify {shlex.quote(s['store'])} && medusa-cache train --cache "
          f"{shlex.quote(s['store'])} --out heads")


def _export_features(cfg) -> None:
    from .export_features import export_features

    s = export_features(cfg)
    print(f"exported {s['sequences']} sequences, {s['tokens']:,} tokens as {s['format']} features ({s['dtype']}, "
          f"auxiliary layers {s['aux_layers']}) into {s['out']}")


def _export(cfg) -> None:
    from pathlib import Path

    from .export import export

    base = export(cfg.dir, cfg.format, cfg.out, overwrite=cfg.overwrite, base_model=cfg.base_model,
                  safetensors=cfg.safetensors)
    files = sorted(f for f in Path(cfg.out).iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {cfg.format} heads to {cfg.out}: {', '.join(f.name for f in files)} ({size / 1e6:.1f} MB; "
          f"base_model_name_or_path: {base})")


def _speculate(cfg) -> None:
    from .dist import set_threads
    from .speculate import render, run_speculate

    set_threads(cfg.threads)
    res = run_speculate(cfg)
    print(json.dumps(res, indent=2) if cfg.json else render(res))
    if cfg.out:
        print(f"results: {cfg.out}/results.json, {cfg.out}/report.md")


def _eval(cfg) -> None:
    from .dist import set_threads
    from .evaluate import COLUMNS, category_table, render_table, run_eval

    set_threads(cfg.threads)
    res = run_eval(cfg)
    if cfg.json:
        print(json.dumps(res, indent=2))
        return
    if "tree_tokens_per_step" in res:
        ci = res["tree_tokens_per_step_ci"]
        print(f"tree {cfg.tree}: {res['tree_tokens_per_step']:.3f} tokens per step [{ci[0]:.2f}, {ci[1]:.2f}] "
              f"(per-position acceptance {res['tree_acceptance']:.3f})")
    print(render_table([res], cfg.tree_budget or []))
    if res.get("categories"):
        print(f"\nper category ({'tree ' + cfg.tree if cfg.tree else 'chain'}):")
        print(category_table(res["categories"]))
    print(f"\n{COLUMNS}")
    for k in (1, 5, cfg.topk):
        print(f"top{k} per head: " + " ".join(f"{x:.3f}" for x in res[f"top{k}"]))


def _ablate(configs) -> None:
    from . import dist
    from .ablate import run_ablate

    cfg, a = configs
    dist.set_threads(cfg.threads)
    _, _, cfg.device = dist.setup(cfg.device)
    run_ablate(cfg, a)


def _ablate_configs(args: argparse.Namespace):
    """(TrainConfig, AblateConfig), each built once; the train config holds the largest head count (and the largest
    --layers/--lr when given; otherwise the config file's or the dataclass's one value, which ``run_ablate`` then
    takes as the only one: the default is resolved there, once)."""
    import dataclasses

    from .ablate import AblateConfig
    from .config import load_config_file
    from .train import TrainConfig

    a = build_config(AblateConfig, args)
    own = {f.name for f in dataclasses.fields(AblateConfig)}
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in own})
    file = load_config_file(args.config, TrainConfig) if args.config else {}  # read once, the base of the flags
    given = {**({"num_layers": max(a.layers)} if a.layers else {}), **({"lr": max(a.lr)} if a.lr else {})}
    return build_config(TrainConfig, rest, base=file, num_heads=max(a.heads), **given), a


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, an example, the config dataclass(es) its flags come from, what runs it."""

    name: str
    help: str
    example: str
    config: str
    """module:Class of the config dataclass (its fields are the flags, their docstrings the help)"""
    run: Callable[[Any], None]
    config_file: bool = False
    """--config FILE: a JSON file mirroring the config (dump, train, ablate)"""
    also: str | None = None
    """a second dataclass adding flags (ablate: its own beside TrainConfig's)"""
    skip: tuple[str, ...] = ()
    base: Callable[[argparse.Namespace], dict | None] | None = None
    """the values the config starts from (train --resume: the stored settings)"""
    build: Callable[[argparse.Namespace], Any] | None = None
    """builds the config(s) itself (ablate: two)"""


COMMANDS = (
    Command("dump", "run the model once over chat data and write the cache",
            "medusa-cache dump --model M --data a.json b.jsonl --out c.zarr --draft-vocab-size 32000 --dtype bfloat16",
            "dump:DumpConfig", _dump, config_file=True),
    Command("inspect", "summarise a cache: sizes, counts, fingerprints, progress",
            "medusa-cache inspect cache.zarr --json | head", "info:InspectConfig", _inspect),
    Command("verify", "check a cache: layout, labels, mapping, progress; --deep decodes all data",
            "medusa-cache verify cache.zarr --deep --model PATH/TO/MODEL --samples 8", "verify:VerifyConfig", _verify),
    Command("train", "train Medusa heads from a cache (the backbone is never loaded)",
            "medusa-cache train --cache c.zarr --out heads --config configs/llama3-8B-medusa.json --epochs 2",
            "trainconfig:TrainConfig", _train, config_file=True, base=_train_base),
    Command("eval", "tokens per decoding step, acceptance and per-head accuracy on a cache or on held-out prompts",
            "medusa-cache eval --heads heads --cache heldout.zarr --tree-budget 16,32,64 --trees-out trees",
            "evaluate:EvalConfig", _eval),
    Command("ablate", "train and evaluate several head counts / layers / lrs in one pass",
            "medusa-cache ablate --cache c.zarr --out abl --heads 1,2,3,4,5 --layers 1,2 --tree-budget 16,32,64 "
            "--epochs 2", "trainconfig:TrainConfig", _ablate, config_file=True, also="ablate:AblateConfig",
            skip=("num_heads", "num_layers", "lr", "clip_per_head", "data_fraction"), build=_ablate_configs),
    Command("speculate", "real Medusa decoding with trained heads, checked against greedy decoding",
            "medusa-cache speculate --model M --heads heads --prompts p.jsonl --tree trees/tree_32.json "
            "--max-new-tokens 128 --out spec", "speculate:SpeculateConfig", _speculate),
    Command("generate", "self-distilled data: the base model's own continuations / assistant turns",
            "medusa-cache generate --model PATH/TO/MODEL --prompts prompts.jsonl --out self.jsonl --max-new-tokens 256",
            "generate:GenerateConfig", _generate),
    Command("demo", "generate -> dump -> ablate -> speculate on the bundled stories260K, offline, CPU",
            "medusa-cache demo --out /tmp/demo --epochs 4", "demo:DemoConfig", _demo),
    Command("import", "a cache from SpecForge's or speculators' offline Eagle3 features (one capture for both)",
            "medusa-cache import features/ --format specforge --model PATH/TO/MODEL --out cache.zarr",
            "importer:ImportConfig", _import),
    Command("export-features", "Eagle3's offline features (SpecForge or speculators) from a cache with --aux-layers",
            "medusa-cache export-features cache.zarr --format specforge --out features/",
            "export_features:ExportFeaturesConfig", _export_features),
    Command("export", "write trained heads in a serving layout (vLLM or Medusa reference)",
            "medusa-cache export heads --format vllm --out heads-vllm --base-model meta-llama/Llama-3.1-8B-Instruct",
            "export:ExportConfig", _export),
)


def _class(spec: str) -> type:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(f"medusa_cache.{module}"), name)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (``-h`` still shows the full usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per row of ``COMMANDS``, its flags generated from the command's config dataclass."""
    from . import __version__

    p = _Parser(prog="medusa-cache", epilog=EPILOG, formatter_class=RAW, description="Run the backbone once into a "
                "Zarr cache of hidden states, then train Medusa heads from it.")
    p.add_argument("--version", action="version", version=f"medusa-cache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, epilog=f"example:\n  {c.example}", formatter_class=RAW)
        if c.config_file:
            sp.add_argument("--config", help=f"JSON config file mirroring the {c.name} flags; explicit flags "
                            "override it")
        if c.also:
            add_config_args(sp, _class(c.also))
        add_config_args(sp, _class(c.config), skip=c.skip)
        sp.set_defaults(command_spec=c)
    return p


def _run(args: argparse.Namespace) -> None:
    c: Command = args.command_spec
    if c.build is not None:
        c.run(c.build(args))
        return
    base = c.base(args) if c.base else None
    c.run(build_config(_class(c.config), args, getattr(args, "config", None) if c.config_file else None, base=base))


FSSPEC_PACKAGES = ("s3fs", "gcsfs", "adlfs")  # what fsspec needs for s3://, gs://, az:// store URLs


def library_failure(e: BaseException) -> str | None:
    """One line for a failure of a library on bad input (a path, a template, a store, a credential), naming the
    thing and what to do; None for anything else (a bug: its traceback is kept)."""
    name, module = type(e).__name__, type(e).__module__
    if module.startswith("jinja2"):
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        return (f"the chat template does not render: {name}: {e}{where}; fix --chat-template or the tokenizer's "
                "chat_template")
    if isinstance(e, ImportError):  # ModuleNotFoundError, or fsspec's plain ImportError("Install s3fs to access S3")
        pkg = e.name if getattr(e, "name", None) in FSSPEC_PACKAGES else next(
            (p for p in FSSPEC_PACKAGES if p in str(e)), None)
        if pkg:
            return f"this store URL needs the {pkg} package: pip install 'medusa-cache[s3]' (or {pkg})"
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
        _run(args)
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
