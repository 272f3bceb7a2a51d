"""torch.distributed plumbing for commands launched by ``torchrun`` (``python -m medusa_cache`` works too).

``setup()`` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; with more than one process it initialises the
default process group (NCCL for CUDA, gloo for the CPU) and pins ``cuda`` to the local GPU. A single process
needs no process group. Errors are agreed on collectively where ranks meet (rank 0's preparation, the end of
the dump's unit loop): any exception on one rank becomes the same UserError on every rank. Elsewhere (inside
a training step) a rank that fails exits at once (``cli.main``: ``os._exit(1)``, no collective teardown); the
others' collectives then fail (gloo) and they exit too, and torchrun stops the group.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from .errors import UserError


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads (None keeps torch's default of one per core)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def setup(device: str = "cpu") -> tuple[int, int, str]:
    """(rank, world_size, device) for this process."""
    check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        import torch

        if device == "cuda":  # set_device needs an index: this rank's GPU, or the current one for one process
            device = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(device))  # as torch's examples: collectives use this rank's GPU
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            import torch

            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return rank, world, device


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything is read or written."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device != "cpu" and not device.startswith(("mps", "xpu")):
        raise UserError(f"--device: unknown device {device!r} (cpu, cuda or cuda:N)")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def agree(error: str | None) -> None:
    """Collective: raise UserError on every rank if any rank reports an error (the lowest rank's message)."""
    if active():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def on_rank0(fn, rank: int):
    """Run ``fn`` on rank 0 only; its UserError is raised on every rank."""
    err = None
    result = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - agreed on, so the other ranks do not wait forever
            if not active() and not isinstance(e, UserError):
                raise
            err = str(e) if isinstance(e, UserError) else f"rank 0: {type(e).__name__}: {e}"
    agree(err)
    return result


def rank() -> int:
    return dist.get_rank() if active() else 0
