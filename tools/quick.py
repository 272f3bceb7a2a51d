"""What the tools' ``--quick`` modes share: a small demo directory, the layout ``medusa-cache demo`` writes
(``stories.jsonl``, ``cache.zarr``, ``ablate/results.json``, ``ablate/best``, ``ablate/trees``), built in seconds
on the bundled stories260K and reused by every tool of one CI run.

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
    """The small demo directory (built when absent): 24 stories of 64 new tokens, 1 and 2 heads, 2 epochs."""
    from medusa_cache.ablate import AblateConfig, run_ablate
    from medusa_cache.demo import DEMO
    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.store import is_store
    from medusa_cache.train import TrainConfig

    out = Path(path or DEFAULT)
    if (out / "ablate" / "results.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = str(DEMO / "stories260K")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join((DEMO / "prompts.jsonl").read_text().splitlines(keepends=True)[:24]))
    stories = out / "stories.jsonl"
    generate(GenerateConfig(model=model, prompts=str(prompts), out=str(stories), max_new_tokens=64, batch_size=24,
                            overwrite=stories.exists()))
    cache = out / "cache.zarr"
    run_dump(DumpConfig(model=model, data=[str(stories)], out=str(cache), dtype="float32", max_length=256,
                        overwrite=is_store(cache, partial=True)))
    cfg = TrainConfig(cache=str(cache), out=str(out / "ablate"), epochs=2, lr=3e-3, batch_tokens=512, grad_accum=1,
                      val_fraction=0.2, init_from_lm_head=model, overwrite=(out / "ablate").exists())
    run_ablate(cfg, AblateConfig(heads=[1, 2], layers=[1], lr=[3e-3], tree_budget=[16, 32, 64], verify_cost=0.05))
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
