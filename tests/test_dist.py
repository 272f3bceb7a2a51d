"""dist.setup on a CUDA machine, with torch.cuda stood in for (the GPU run itself: tools/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from medusa_cache import dist


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a 2-GPU machine; set_device refuses an index-less device, as the real one does."""
    chosen = []

    def set_device(d):
        d = torch.device(d) if isinstance(d, str) else d
        if d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        chosen.append(d.index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return chosen


def test_plain_cuda_becomes_an_indexed_device_for_one_process(fake_cuda):
    assert dist.setup("cuda") == (0, 1, "cuda:0") and fake_cuda == [0]
    assert dist.setup("cuda:1") == (0, 1, "cuda:1") and fake_cuda == [0, 1]
