"""The subcommands of ``python -m resnet_fast`` (also installed as ``resnet-fast``).

``verify``, ``info``, ``bench`` and ``train`` live in the modules of this package, each with
``add_arguments(parser)`` and ``run(args) -> int``; :mod:`resnet_fast.__main__` builds the
parser from them.

Bad input (an unknown name, an unusable device or backend, a missing file, an unwritable
directory) is a :class:`UsageError`: ``main`` prints its message as one line on stderr and
exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from resnet_fast.reference_models import ARCHITECTURES

__all__ = [
    "UsageError", "OneLineParser", "MODELS", "DEVICES", "parse_size", "check_device",
    "check_backend", "check_choice", "check_writable_dir", "min_input_size", "check_input_size",
]

# The model builders of resnet_fast.models (and, under the same names, resnet_fast.reference).
MODELS = tuple(ARCHITECTURES)
DEVICES = ("cpu", "cuda")


class UsageError(Exception):
    """Bad input from the command line: reported as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: message``) on stderr and
    exit status 2, without the usage block argparse prints by default."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _listing(choices: Iterable[str]) -> str:
    return ", ".join(choices)


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; valid: {_listing(choices)}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """``'64x48'`` -> (64, 48); ``'64'`` -> (64, 64)."""
    parts = str(text).lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise UsageError(f"--size {text!r} is not a size; expected HxW (e.g. 64x64) or one "
                         "number for a square") from None
    if h < 1 or w < 1:
        raise UsageError(f"--size {text!r} must be positive")
    return h, w


def check_device(name: str) -> None:
    check_choice("device", name, DEVICES)
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = ("a CPU-only build" if torch.version.cuda is None
                     else f"built with CUDA {torch.version.cuda}, but no device is visible")
            raise UsageError(f"--device cuda, but torch sees no CUDA device (torch "
                             f"{torch.__version__}: {build}); valid here: cpu")


def check_backend(name: Optional[str], device: str) -> None:
    """Raises UsageError unless backend ``name`` (None: the default) can run on ``device``."""
    if name is None:
        return
    from resnet_fast import BACKENDS, available_backends, unavailable_reason

    check_choice("backend", name, BACKENDS)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise UsageError(f"backend {name!r} is not available on {device}: {reason}; available "
                         f"on {device}: {_listing(available_backends(device))}")


def check_writable_dir(path: os.PathLike | str, what: str = "output directory") -> Path:
    """Creates ``path`` if needed and checks a file can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {what} {str(path)!r}: "
                         f"{exc.strerror or exc}") from None
    return path


def min_input_size(small_input: bool) -> int:
    """The smallest input side a ResNet takes without its last stage running on padding only:
    its total stride, 32 with the ImageNet stem (stride-2 conv1 and max-pool), 8 with the
    small-input stem."""
    return 8 if small_input else 32


def check_input_size(size: tuple[int, int], small_input: bool, model: str) -> None:
    least = min_input_size(small_input)
    if min(size) < least:
        stem = "small-input (3x3 stride-1) stem" if small_input else "ImageNet (7x7 stride-2 + " \
            "max-pool) stem"
        raise UsageError(f"--size {size[0]}x{size[1]} is too small for {model} with the {stem}: "
                         f"it downsamples by {least}, so each side must be at least {least}")
