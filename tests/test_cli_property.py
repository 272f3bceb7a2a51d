"""Property: no option value a user can type makes any command print a traceback or write anything.

Hypothesis draws a command, one of its options that takes a value, and a bad value for it (out of range, of the
wrong type, not among the choices, a path that does not exist); the rest of the command line is valid. Every draw
must exit 2 with one line on stderr naming the flag or the file, no traceback, and leave the directory untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_cache.cli import build_parser, main

SKIP = {"--config", "--help", "--version", "--out", "--trees-out", "--device", "--report-to", "--base-model",
        "--base-model-name-or-path", "--system-prompt", "--tokenizer", "--format", "--prompts", "--heads", "--cache",
        "--model", "--data", "--val-cache", "--tree", "--vocab-mapping", "--chat-template", "--init-from-lm-head",
        "--distill", "--speculate-prompts", "--wandb-project", "--run-name", "--head-loss-weights"}


def _options() -> list[tuple[str, str, argparse.Action]]:
    """(command, flag, action) for every option of every command that takes a typed value."""
    out = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for act in parser._actions:
            flags = [f for f in act.option_strings if f.startswith("--")]
            if not flags or flags[0] in SKIP or act.nargs == 0:
                continue
            out.append((command, flags[0], act))
    return out


OPTIONS = _options()


# options where 0 is a legitimate value with a documented meaning (no clipping, no warmup, greedy, ...): their bad
# numbers are the negative ones; for every other numeric option 0 is bad too. Nothing drawn here may be accepted.
ZERO_OK = {"--val-fraction", "--warmup-ratio", "--checkpoint-minutes", "--distill-weight", "--max-grad-norm", "--seed",
           "--temperature", "--verify-cost", "--weight-decay", "--aux-layers"}  # --aux-layers 0: decoder layer 0


def _bad_values(act: argparse.Action) -> st.SearchStrategy[str]:
    if act.choices:
        return st.text(alphabet="abcxyz-_", min_size=1, max_size=8).filter(lambda s: s not in act.choices)
    words = st.sampled_from(["abc", "1e", "--", "one", "2,,x", "nan", "1.5.2"])
    top = -1 if act.option_strings[0] in ZERO_OK else 0
    numbers = st.one_of(st.integers(max_value=top), st.floats(max_value=-1e-3, allow_nan=False, allow_infinity=False))
    return st.one_of(words, numbers.map(str))


BASE = {  # valid otherwise: the draws fail on the one bad value, before any work
    "dump": ["--model", "{m}", "--data", "{d}", "--out", "{o}"],
    "train": ["--cache", "{c}", "--out", "{o}"],
    "ablate": ["--cache", "{c}", "--out", "{o}"],
    "eval": ["--heads", "{h}", "--cache", "{c}"],
    "generate": ["--model", "{m}", "--prompts", "{d}", "--out", "{o}.jsonl"],
    "speculate": ["--model", "{m}", "--heads", "{h}", "--prompts", "{d}", "--chain"],
    "verify": ["{c}"], "inspect": ["{c}"], "demo": ["--out", "{o}"],
    "export": ["{h}", "--format", "vllm", "--out", "{o}"],
    "export-features": ["{c}", "--out", "{o}"],
    "import": ["{root}", "--model", "{m}", "--out", "{o}"],
}


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")}


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_bad_option_value_is_one_line_exit_2_and_writes_nothing(data, property_env):
    command, flag, act = data.draw(st.sampled_from([o for o in OPTIONS if o[0] in BASE]), label="option")
    value = data.draw(_bad_values(act), label="value")
    env = property_env
    argv = [command] + [a.format(**env) for a in BASE[command]] + [f"{flag}={value}"]
    before = _snapshot(Path(env["root"]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    text = err.getvalue()
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("Loading weights", "\r"))]
    assert rc == 2, (argv, "a bad value was accepted" if rc == 0 else "", text)
    assert "Traceback" not in text and len(lines) == 1, (argv, text)
    assert flag in lines[0] or flag.lstrip("-").replace("-", "_") in lines[0] or "argument" in lines[0], (argv, text)
    assert _snapshot(Path(env["root"])) == before, (argv, "something was written")
