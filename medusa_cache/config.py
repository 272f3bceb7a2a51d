"""Typed dataclass configs whose field docstrings are the CLI help.

Every command's options are one dataclass (``DumpConfig``, ``TrainConfig``, ...). The same dataclass:
- generates the argparse flags (``max_length`` -> ``--max-length``), help text taken from the docstring
  written under each field, so a flag is declared exactly once;
- loads JSON config files that mirror it one-to-one (unknown keys are an error naming the file and key;
  the key ``"command"`` holds the command line that uses the file and is ignored);
- validates itself in ``__post_init__``, raising ``UserError`` that names the flag.

Precedence: dataclass defaults < config file < flags given explicitly on the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

from .errors import UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written as string literals right under dataclass fields."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass).lstrip())
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) for ``int``, ``int | None``, ``list[float] | None`` ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    if origin is typing.Literal:
        return str, False
    return tp, False


def _choices(tp: Any) -> list[str] | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            c = _choices(a)
            if c:
                return c
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    return None


class _ExtendFlat(argparse.Action):
    """``--heads 1,2 3`` and ``--heads 1 --heads 2,3``: every value, in order (each may be a comma list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is argparse.SUPPRESS else list(items)
        setattr(namespace, self.dest, items + [x for v in values for x in v])


def comma_list(kind: type):
    """argparse type: comma-separated numbers, e.g. ``1,2,3`` (one flag value)."""
    what = {int: "integers", float: "numbers"}[kind]

    def parse(s: str) -> list:
        try:
            out = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        return out

    parse.__name__ = f"{what} list"
    return parse


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field; defaults are SUPPRESSed so we can tell which flags were given.

    Fields named in ``cls.POSITIONAL`` are positional arguments; number lists take comma-separated values too."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for name in getattr(cls, "POSITIONAL", ()):
        parser.add_argument(name, help=docs.get(name, ""))
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_") or f.name in getattr(cls, "POSITIONAL", ()):
            continue
        tp = hints[f.name]
        inner, is_list = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = docs.get(f.name, "")
        if default not in (None, False, [], ""):
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        required = f.name in getattr(cls, "REQUIRED", ())
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name,
                                  **({"required": True} if required else {})}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = inner if inner in (int, float) else str
            if is_list and inner in (int, float):  # `--heads 1,2,3`, `--heads 1 2 3`
                kwargs.update(nargs="+", action=_ExtendFlat, type=comma_list(inner))
            elif is_list:  # `--data a b` and `--data a --data b` both give [a, b]
                kwargs["nargs"] = "+"
                kwargs["action"] = "extend"
            choices = _choices(tp)
            if choices:
                kwargs["choices"] = choices
            kwargs["metavar"] = f.name.upper() if not choices else None
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        parser.add_argument(flag(f.name), **kwargs)


def load_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config: {path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return check_config_dict(raw, cls, f"--config: {path}")


def check_config_dict(raw: Any, cls: type, where: str) -> dict[str, Any]:
    """A JSON object of ``cls``'s fields (its ``"command"`` and ``"about"`` keys, documentation, dropped), every key
    known and of its field's type; errors start with ``where`` (the flag and the file)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object at the top level")
    raw.pop("command", None)
    raw.pop("about", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        problem = type_problem(hints[key], value)
        if problem:
            raise UserError(f"{where}: key {key!r} must be {problem}, got {json.dumps(value)} "
                            f"({type(value).__name__})")
    return raw


def type_problem(tp: Any, value: Any) -> str | None:
    """None if ``value`` (from JSON) fits the field type ``tp``, else the expected type in words."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        problems = [type_problem(a, value) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else " or ".join(problems) + \
            (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return None if value in choices else "one of " + ", ".join(json.dumps(c) for c in choices)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return f"a list of {_words(inner)}"
        bad = [type_problem(inner, v) for v in value]
        return None if not any(bad) else f"a list of {_words(inner)}"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    return None


def _words(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, str(tp))


def build_config(cls: type, namespace: argparse.Namespace, config_file: str | None = None,
                 base: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """``base`` (e.g. a resumed run's stored settings) < ``config_file`` < flags given < ``fixed``."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in names}
    if config_file:
        values.update(load_config_file(config_file, cls))
    given = {k: v for k, v in vars(namespace).items() if k in names}
    hints = typing.get_type_hints(cls)
    for k, v in given.items():  # argparse turns a value of "--" into an empty list, whatever the type
        if isinstance(v, list) and not _base_type(hints[k])[1]:
            raise UserError(f"{flag(k)}: expected one value, got {v!r}")
        if v == [] and _base_type(hints[k])[1]:  # a list option given with no value means nothing: refuse it
            raise UserError(f"{flag(k)}: expected at least one value, got none")
    values.update(given)
    values.update(fixed)
    try:
        return cls(**values)
    except TypeError as e:  # missing required field
        if "missing" not in str(e):
            raise UserError(f"{cls.__name__}: {e}") from None
        missing = str(e).split("argument")[-1].strip(": '")
        raise UserError(f"missing required option {flag(missing)} ({e})") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_common(cfg: Any) -> None:
    """The checks every command's config shares, written once: each option its ``REQUIRED`` names is given (not
    None, not an empty list; the CLI also marks them required in --help), ``--threads`` >= 1, not both
    ``--resume`` and ``--overwrite``, and a store layout's ``--chunk-tokens``/``--shard-tokens``; for configs built by
    the CLI and in code alike."""
    for name in getattr(cfg, "REQUIRED", ()):
        value = getattr(cfg, name)
        check(value is not None and value != [], name, "is required")
    threads = getattr(cfg, "threads", None)
    check(threads is None or threads >= 1, "threads", f"must be >= 1, got {threads}")
    check(not (getattr(cfg, "resume", False) and getattr(cfg, "overwrite", False)), "resume",
          "--resume and --overwrite exclude each other")
    chunk, shard = getattr(cfg, "chunk_tokens", None), getattr(cfg, "shard_tokens", None)  # a store's layout flags
    for name, v in (("chunk_tokens", chunk), ("shard_tokens", shard)):
        check(v is None or v >= 1, name, f"must be >= 1, got {v}")
    check(not (chunk and shard and shard % chunk), "shard_tokens", "must be a multiple of --chunk-tokens")


def check(cond: bool, name: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ``UserError`` naming the flag."""
    if not cond:
        raise UserError(f"{flag(name)}: {message}")
