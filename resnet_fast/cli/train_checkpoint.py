"""Checkpoints of ``python -m resnet_fast train``: the format, atomic writes, one-line errors
for a file that is not one, and the random number generators' state.

A checkpoint (format ``resnet_fast.train/1``) is a dict: ``config`` (the settings that fix what
it continues), ``step``, ``epoch``, ``steps_per_epoch``, ``num_classes``, ``runs`` (per model:
weights, optimizer, scheduler, grad scaler, history), ``rng`` (the random generators of the
process that wrote it, rank 0) and ``world_size`` (the processes that trained it; absent: 1),
with ``rank_rng`` (every process's generators, by rank) when there were several.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

from resnet_fast.cli import UsageError

CHECKPOINT_FORMAT = "resnet_fast.train/1"


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically: a temporary file in the same directory,
    flushed to disk, then renamed over ``path``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"--resume {path!r}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, another format, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--resume {path!r} is not a readable checkpoint: {first}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if not isinstance(found, str) or not found.startswith(CHECKPOINT_FORMAT.split("/")[0] + "/"):
        raise UsageError(f"--resume {path!r} is not a checkpoint of `resnet_fast train` "
                         f"(format {CHECKPOINT_FORMAT})")
    if found != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path!r} has checkpoint format {found!r}; this version of "
                         f"resnet_fast reads {CHECKPOINT_FORMAT!r} only, the one format written "
                         f"so far")
    return state


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def check_world_size(checkpoint: dict, path: str, world: int) -> None:
    """A checkpoint continues with as many processes as wrote it: the data order, the batch of a
    step and the per-process generators depend on the number."""
    saved = int(checkpoint.get("world_size", 1))
    if saved != world:
        how = f"--nproc-per-node {saved}" if saved > 1 else "one process (no --nproc-per-node)"
        raise UsageError(f"--resume {path!r} was trained by {saved} process(es), this run has "
                         f"{world}; resume with {how}")


def process_rng_state(checkpoint: dict, rank: int) -> dict:
    """The generators' state that process ``rank`` saved in ``checkpoint``."""
    return checkpoint["rank_rng"][rank] if "rank_rng" in checkpoint else checkpoint["rng"]
