"""What the tools' ``--quick`` modes share: a demo directory (``stories.jsonl``, ``cache.zarr``,
``ablate/results.json``, ``ablate/best``, ``ablate/trees``) written by ``medusa-cache demo``'s own function with one
epoch, in about ten seconds, and reused by every tool of one CI run.

    python tools/quick.py [DIR]      # build it (default: $TMPDIR/medusa-cache-quick-demo) and print its path

Quick modes measure nothing worth quoting: they run each tool's whole path on small inputs, so a tool that no
longer runs is found by CI (``.ci/tools``), not by the next person who needs its numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT = Path(tempfile.gettempdir()) / "medusa-cache-quick-demo"


def quick_demo(path: str | Path | None = None) -> Path:
    """The demo directory, built by ``medusa-cache demo`` itself with one epoch when absent (about ten seconds)."""
    from medusa_cache.demo import DemoConfig, run_demo

    out = Path(path or DEFAULT)
    if not (out / "ablate" / "results.json").exists():
        run_demo(DemoConfig(out=str(out), epochs=1))
    return out


def tokenizer_dir(src: Path) -> Path:
    """``src`` if it holds ``tokenizer.json``, else a temporary copy with the vendored ``tokenizer.json.xz`` unpacked
    (tests/fixtures/tokenizers/*)."""
    import lzma
    import shutil

    if (src / "tokenizer.json").exists():
        return src
    dst = Path(tempfile.mkdtemp()) / src.name
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".xz"):
            (dst / f.name[:-3]).write_bytes(lzma.decompress(f.read_bytes()))
        else:
            shutil.copy(f, dst / f.name)
    return dst


if __name__ == "__main__":
    print(quick_demo(sys.argv[1] if len(sys.argv) > 1 else None))
