"""``python -m resnet_fast train``: train a ResNet on the fused ops, optionally next to eager.

A plain training loop: SGD with momentum and weight decay (not on BatchNorm parameters and
biases), a learning rate schedule stepped every batch (``cosine`` to zero, or ``step``: divided
by 10 at a third and at two thirds of training), cross-entropy loss, a tqdm bar with the running
loss, accuracy and images/s, and a test-set evaluation after every epoch (and where
``--max-steps`` ends training).

The fused model is :mod:`resnet_fast.models`'s. One epoch of ``--data digits --size 16
--compare-eager`` (23 steps of 64 images, each model) is a demo of under a minute on 2 CPU cores.

Data (``--data``):

``digits``
    scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes, bundled with
    scikit-learn), upsampled to ``--size`` (default 32x32), repeated to 3 channels, split 80/20
    into train and test. The model gets the small-input stem by default.
``fake``
    Random images and labels (``--fake-samples``), for throughput.
``folder:PATH``
    An ImageFolder-style tree read with PIL: ``PATH/<class>/<image>``, or ``PATH/train/<class>``
    with ``PATH/val`` (or ``PATH/test``) beside it; without a test split, 20% of the images are
    held out. Images are resized to ``--size`` (default 64x64).

``--compare-eager`` trains the eager model of :mod:`resnet_fast.reference` beside the fused one,
from the same initial weights on the same batches in the same order (the two take turns, step by
step), and writes a loss-curve plot of both and a summary: each one's final test accuracy and
images/s, and their ratio.

``--checkpoint PATH`` is written (atomically: a temporary file in the same directory, then
``os.replace``) after every epoch and at the end, with the models, optimizers, schedulers,
step, epoch and RNG states; ``--resume PATH`` continues from one with the same settings (those
not given are taken from it). Ctrl-C finishes the current step, saves a checkpoint (to
``--checkpoint``, else ``OUT/checkpoint.pt``) and exits with status 130.

Outputs in ``--out`` (default ``runs/<model>_<data>``): ``history.csv`` (one row per step and
model), ``summary.json``, and ``loss_curve.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from resnet_fast.cli import (DEVICES, MODELS, UsageError, check_backend, check_device,
                             check_input_size, check_writable_dir, parse_size)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DATA_CHOICES = "digits, fake, folder:PATH"
CHECKPOINT_FORMAT = "resnet_fast.train/1"

# Settings that fix what a checkpoint continues: on --resume, those not given come from the
# checkpoint and those given must match it.
DEFAULTS = dict(model="resnet18", data="digits", size=None, small_input=None, epochs=1,
                batch=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=0,
                compare_eager=False, amp=False, amp_dtype=None, fake_samples=512,
                test_fraction=0.2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from resnet_fast.backends import BACKENDS

    p.add_argument("--model", choices=MODELS, default=None, help="default: resnet18")
    p.add_argument("--data", default=None, help=f"{DATA_CHOICES} (default: digits)")
    p.add_argument("--size", default=None,
                   help="image HxW (default: 32 for digits and fake, 64 for folder:PATH)")
    p.add_argument("--small-input", default=None, action=argparse.BooleanOptionalAction,
                   help="the small-input stem (3x3 stride-1 conv1, no max-pool); default: when "
                        "the size is under 64")
    p.add_argument("--epochs", type=int, default=None, help="default: 1")
    p.add_argument("--batch", type=int, default=None, help="default: 64")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.05)")
    p.add_argument("--momentum", type=float, default=None, help="default: 0.9")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4")
    p.add_argument("--schedule", choices=("cosine", "step"), default=None,
                   help="learning rate per step: cosine to 0, or /10 at 1/3 and 2/3 "
                        "(default: cosine)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="backend of the fused model (default: the device's default)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="default: cuda when torch sees a GPU")
    p.add_argument("--compare-eager", action="store_true", default=None,
                   help="also train the eager reference model from the same weights and data")
    p.add_argument("--amp", action="store_true", default=None,
                   help="torch.autocast: bfloat16 on the CPU, float16 (with a GradScaler) or "
                        "bfloat16 on CUDA")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default=None,
                   help="autocast dtype (default: bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and images in channels_last")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="write a checkpoint here after every epoch and at the end")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint")
    p.add_argument("--seed", type=int, default=None, help="weights and data order (default: 0)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<model>_<data>)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in all (the last epoch is cut short)")
    p.add_argument("--fake-samples", type=int, default=None,
                   help="training images of --data fake (default: 512; a quarter as many test)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share held out for testing when the data has no test split "
                        "(default: 0.2)")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class Data:
    """A train and a test split; ``batch(split, indices)`` gives float32 NCHW images and
    int64 labels on the CPU."""

    name: str
    classes: list
    train_len: int
    test_len: int

    def batch(self, split: str, indices):
        raise NotImplementedError


class TensorData(Data):
    def __init__(self, name, classes, train, test):
        self.name, self.classes = name, classes
        self.splits = {"train": train, "test": test}
        self.train_len, self.test_len = len(train[1]), len(test[1])

    def batch(self, split, indices):
        x, y = self.splits[split]
        return x[indices], y[indices]


class FolderData(Data):
    """Images read with PIL on first use (kept in memory, as uint8, up to 1 GiB)."""

    CACHE_BYTES = 1 << 30

    def __init__(self, root: Path, classes, train_items, test_items, size):
        self.name, self.classes, self.size = f"folder:{root}", classes, size
        self.items = {"train": train_items, "test": test_items}
        self.train_len, self.test_len = len(train_items), len(test_items)
        self.cache: dict = {}
        self.cached_bytes = 0

    def _load(self, path: str):
        import torch
        from PIL import Image

        if path in self.cache:
            return self.cache[path]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size[1], self.size[0]),
                                              Image.Resampling.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read image {path!r}: {exc}") from None
        t = t.view(self.size[0], self.size[1], 3).permute(2, 0, 1).contiguous()
        if self.cached_bytes + t.numel() <= self.CACHE_BYTES:
            self.cache[path] = t
            self.cached_bytes += t.numel()
        return t

    def batch(self, split, indices):
        import torch

        items = self.items[split]
        x = torch.stack([self._load(items[i][0]) for i in indices.tolist()]).float() / 255
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        y = torch.tensor([items[i][1] for i in indices.tolist()], dtype=torch.long)
        return (x - mean) / std, y


def _split_indices(n: int, fraction: float, seed: int):
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return perm[n_test:], perm[:n_test]


def load_digits(size, seed, fraction) -> Data:
    import torch
    import torch.nn.functional as F
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise UsageError("--data digits needs scikit-learn (pip install scikit-learn); "
                         "valid without it: fake, folder:PATH") from None
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = _split_indices(len(y), fraction, seed)
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).contiguous()
    return TensorData("digits", [str(i) for i in range(10)], (x[train], y[train]),
                      (x[test], y[test]))


def fake_data(size, seed, samples) -> Data:
    import torch

    g = torch.Generator().manual_seed(seed)
    n_test = max(2, samples // 4)

    def make(n):
        return (torch.randn(n, 3, *size, generator=g),
                torch.randint(0, 10, (n,), generator=g))
    return TensorData("fake", [str(i) for i in range(10)], make(samples), make(n_test))


def _class_tree(root: Path) -> tuple[list, list]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, f), label))
    return classes, items


def folder_data(path: str, size, seed, fraction) -> Data:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UsageError("--data folder:PATH needs Pillow (pip install pillow)") from None
    root = Path(path).expanduser()
    if not path:
        raise UsageError(f"--data folder: needs a path (folder:PATH); valid: {DATA_CHOICES}")
    if not root.is_dir():
        raise UsageError(f"data folder {path!r} does not exist or is not a directory "
                         "(expected PATH/<class>/<image>)")
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = next((root / n for n in ("val", "test") if (root / n).is_dir()), None) \
        if train_root != root else None
    classes, items = _class_tree(train_root)
    if not classes:
        raise UsageError(f"data folder {str(train_root)!r} has no class subfolders (expected "
                         "PATH/<class>/<image>, e.g. PATH/cat/1.png)")
    if not items:
        raise UsageError(f"data folder {str(train_root)!r} has no images (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)} under {', '.join(classes)})")
    if test_root is not None:
        test_classes, test_items = _class_tree(test_root)
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in test_classes if c not in index]
        if unknown:
            raise UsageError(f"{str(test_root)!r} has classes that {str(train_root)!r} lacks: "
                             f"{', '.join(unknown)}")
        test_items = [(p, index[test_classes[label]]) for p, label in test_items]
        train_items = items
    else:
        train_idx, test_idx = _split_indices(len(items), fraction, seed)
        train_items = [items[i] for i in train_idx.tolist()]
        test_items = [items[i] for i in test_idx.tolist()]
    return FolderData(root, classes, train_items, test_items, size)


def default_size(data: str) -> tuple[int, int]:
    return (64, 64) if data.startswith("folder:") else (32, 32)


def load_data(cfg) -> Data:
    if cfg.data == "digits":
        return load_digits(cfg.size, cfg.seed, cfg.test_fraction)
    if cfg.data == "fake":
        return fake_data(cfg.size, cfg.seed, cfg.fake_samples)
    return folder_data(cfg.data.partition(":")[2], cfg.size, cfg.seed, cfg.test_fraction)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    model: str
    data: str
    size: tuple
    small_input: bool
    epochs: int
    batch: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    seed: int
    compare_eager: bool
    amp: bool
    amp_dtype: Optional[str]
    fake_samples: int
    test_fraction: float


def _check_data_spec(data: str) -> str:
    if data in ("digits", "fake") or data.startswith("folder:"):
        return data
    raise UsageError(f"unknown --data {data!r}; valid: {DATA_CHOICES}")


def resolve_config(args, checkpoint: Optional[dict]) -> Config:
    """The run's settings: given options, else the checkpoint's (on --resume), else defaults.
    A given option that differs from the checkpoint's is an error."""
    saved = dict(checkpoint["config"]) if checkpoint else {}
    if saved:
        saved["size"] = tuple(saved["size"])
    values = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        if key == "size" and given is not None:
            given = parse_size(given)
        if saved and given is not None and given != saved[key]:
            shown = "x".join(map(str, given)) if key == "size" else given
            was = "x".join(map(str, saved[key])) if key == "size" else saved[key]
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {shown} differs from the checkpoint's ({was}); resume "
                             f"with the same value or leave {flag} out")
        values[key] = given if given is not None else saved.get(key, default)
    values["data"] = _check_data_spec(values["data"])
    if values["size"] is None:
        values["size"] = default_size(values["data"])
    if values["small_input"] is None:
        values["small_input"] = max(values["size"]) < 64
    return Config(**values)


def _validate(cfg: Config, args, device: str) -> None:
    check_input_size(cfg.size, cfg.small_input, cfg.model)
    for name, value, least in (("--epochs", cfg.epochs, 1), ("--batch", cfg.batch, 2),
                               ("--fake-samples", cfg.fake_samples, 2)):
        if value < least:
            raise UsageError(f"{name} {value} must be at least {least}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps} must be at least 1")
    if not 0 < cfg.test_fraction < 1:
        raise UsageError(f"--test-fraction {cfg.test_fraction} must be between 0 and 1")
    if cfg.lr <= 0 or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise UsageError("--lr must be positive, --momentum and --weight-decay not negative")
    if cfg.amp and cfg.amp_dtype == "float16" and device == "cpu":
        raise UsageError("--amp-dtype float16 is for CUDA; valid on the CPU: bfloat16")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One model being trained: fused (resnet_fast.models) or eager (resnet_fast.reference)."""

    name: str
    model: object
    optimizer: object
    scheduler: object
    scaler: object = None
    history: list = dataclasses.field(default_factory=list)  # per step
    tests: list = dataclasses.field(default_factory=list)  # per evaluation
    seconds: float = 0.0  # training time, first step of this process excluded
    images: int = 0
    warm: bool = False
    # running sums over the current epoch, for the progress bar
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    epoch_images: int = 0

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history, "tests": self.tests}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.tests = list(state["tests"])

    def images_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


def _make_run(name, model, cfg: Config, total_steps: int, device: str):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BatchNorm, biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=sorted({max(1, round(total_steps / 3)),
                                    max(1, round(2 * total_steps / 3))}), gamma=0.1)
    scaler = None
    if cfg.amp and device == "cuda" and cfg.amp_dtype == "float16":
        scaler = torch.amp.GradScaler("cuda")
    return Run(name, model, opt, sched, scaler)


def _epoch_batches(cfg: Config, n: int, epoch: int):
    """The batches (index tensors) of one epoch: a permutation fixed by the seed and the epoch,
    so a resumed run sees the same order. A last batch of one image is dropped (BatchNorm
    cannot train on it)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    batches = list(perm.split(cfg.batch))
    if len(batches[-1]) < 2:
        batches.pop()
    return batches


def _steps_per_epoch(cfg: Config, n: int) -> int:
    full, rest = divmod(n, cfg.batch)
    return full + (1 if rest >= 2 else 0)


class _Interrupt:
    """SIGINT during training: the first sets ``requested`` (the loop saves a checkpoint after
    the current step and stops), a second raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        from tqdm import tqdm

        tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to stop "
                   "without one)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


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


def _rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(cfg: Config, device: str):
    import torch

    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, cfg.amp_dtype))


def _train_step(run: Run, x, y, cfg: Config, device: str) -> tuple[float, int, float]:
    """One SGD step; returns (loss, correct predictions, seconds)."""
    import torch
    import torch.nn.functional as F

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    with _autocast(cfg, device):
        out = run.model(x)
        loss = F.cross_entropy(out, y)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    run.scheduler.step()
    loss_value = loss.item()
    correct = int((out.argmax(1) == y).sum().item())
    return loss_value, correct, time.perf_counter() - t0


def _evaluate(run: Run, data: Data, cfg: Config, device: str, memory_format) -> Optional[dict]:
    """Test loss and accuracy (None without test images)."""
    import torch
    import torch.nn.functional as F

    if data.test_len == 0:
        return None
    run.model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad(), _autocast(cfg, device):
        for idx in torch.arange(data.test_len).split(max(cfg.batch, 256)):
            x, y = data.batch("test", idx)
            x = x.to(device).contiguous(memory_format=memory_format)
            y = y.to(device)
            out = run.model(x)
            total_loss += F.cross_entropy(out.float(), y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum().item())
    return {"loss": total_loss / data.test_len, "accuracy": correct / data.test_len}


def run(args) -> int:
    import torch

    try:
        import tqdm  # noqa: F401
    except ImportError:
        raise UsageError("train needs tqdm for its progress bar (pip install tqdm)") from None

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    cfg = resolve_config(args, checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    check_backend(args.backend, device)
    if cfg.amp and cfg.amp_dtype is None:
        cfg.amp_dtype = "bfloat16" if device == "cpu" else "float16"
    _validate(cfg, args, device)
    data = load_data(cfg)
    if data.train_len < 2:
        raise UsageError(f"--data {cfg.data}: {data.train_len} training image(s); need 2 or more")
    data_tag = "folder" if cfg.data.startswith("folder:") else cfg.data
    out = check_writable_dir(args.out or Path("runs") / f"{cfg.model}_{data_tag}")
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    if ckpt_path is not None:
        check_writable_dir(ckpt_path.parent, "checkpoint directory")
    cfg_dict = dataclasses.asdict(cfg)
    from resnet_fast import models, reference
    from resnet_fast.backends import resolve_backend

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    num_classes = len(data.classes)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    fused = getattr(models, cfg.model)(num_classes=num_classes, small_input=cfg.small_input,
                                       backend=args.backend)
    initial = {k: v.clone() for k, v in fused.state_dict().items()}
    modules = [("fused", fused)]
    if cfg.compare_eager:
        eager = getattr(reference, cfg.model)(num_classes=num_classes,
                                              small_input=cfg.small_input)
        eager.load_state_dict(initial)
        modules.append(("eager", eager))
    steps_per_epoch = _steps_per_epoch(cfg, data.train_len)
    total_steps = steps_per_epoch * cfg.epochs
    runs = []
    for name, module in modules:
        module.to(device=device, memory_format=memory_format)
        runs.append(_make_run(name, module, cfg, total_steps, device))
    step = 0
    if checkpoint is not None:
        if checkpoint.get("num_classes") != num_classes:
            raise UsageError(f"--resume {args.resume!r}: the checkpoint's model has "
                             f"{checkpoint.get('num_classes')} classes, --data {cfg.data} has "
                             f"{num_classes}")
        try:
            for r in runs:
                r.load(checkpoint["runs"][r.name])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UsageError(f"--resume {args.resume!r} does not match this run: {first}") \
                from None
        step = int(checkpoint["step"])
        _set_rng_state(checkpoint["rng"])
    backend = resolve_backend(fused.backend, torch.device(device))
    stop_at = min(total_steps, args.max_steps) if args.max_steps else total_steps

    def state(epoch_done: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": cfg_dict, "step": step,
                "epoch": epoch_done, "steps_per_epoch": steps_per_epoch,
                "num_classes": num_classes,
                "runs": {r.name: r.state() for r in runs}, "rng": _rng_state()}

    from tqdm import tqdm

    interrupted = False
    saved_step = None
    with _Interrupt() as interrupt:
        # printed once Ctrl-C is handled (saves a checkpoint)
        print(f"training {cfg.model} ({'small-input' if cfg.small_input else 'ImageNet'} stem) on "
              f"{cfg.data}: {data.train_len} train / {data.test_len} test images, {num_classes} "
              f"classes, {cfg.size[0]}x{cfg.size[1]}, batch {cfg.batch}, {device}"
              f"{', ' + cfg.amp_dtype + ' autocast' if cfg.amp else ''}"
              f"{', channels_last' if args.channels_last else ''}; fused backend {backend}"
              f"{'; eager reference alongside' if cfg.compare_eager else ''}; "
              + (f"resuming at step {step}/{total_steps}" if checkpoint else
                 f"{total_steps} steps") + (f", stopping at step {stop_at}"
                                            if stop_at < total_steps else ""), flush=True)
        if step >= stop_at:
            print(f"nothing to train: step {step} reached"
                  + (" the end of training" if step >= total_steps else " --max-steps"))
        epoch = step // steps_per_epoch
        while step < stop_at and not interrupted:
            batches = _epoch_batches(cfg, data.train_len, epoch)
            first = step - epoch * steps_per_epoch
            last = min(steps_per_epoch, stop_at - epoch * steps_per_epoch)
            for r in runs:
                r.epoch_loss, r.epoch_correct, r.epoch_images = 0.0, 0, 0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/"
                       f"{cfg.epochs}", unit="step", file=sys.stderr, dynamic_ncols=True,
                       mininterval=0.5)
            for i in range(first, last):
                x, y = data.batch("train", batches[i])
                x = x.to(device).contiguous(memory_format=memory_format)
                y = y.to(device)
                lr = runs[0].optimizer.param_groups[0]["lr"]
                for r in runs:
                    loss, correct, seconds = _train_step(r, x, y, cfg, device)
                    if r.warm:
                        r.seconds += seconds
                        r.images += len(y)
                    r.warm = True
                    r.epoch_loss += loss * len(y)
                    r.epoch_correct += correct
                    r.epoch_images += len(y)
                    r.history.append({"step": step + 1, "epoch": epoch + 1, "loss": loss,
                                      "accuracy": correct / len(y), "lr": lr,
                                      "images_per_s": len(y) / seconds})
                step += 1
                bar.update(1)
                head = runs[0]

                def rate(r):  # since the first (warm-up) step of this process
                    return r.images_per_s() or r.history[-1]["images_per_s"]
                post = {"loss": f"{head.epoch_loss / head.epoch_images:.3f}",
                        "acc": f"{head.epoch_correct / head.epoch_images:.1%}",
                        "img/s": f"{rate(head):.0f}"}
                if len(runs) > 1:
                    post["eager loss"] = f"{runs[1].epoch_loss / runs[1].epoch_images:.3f}"
                    post["eager img/s"] = f"{rate(runs[1]):.0f}"
                bar.set_postfix(post, refresh=False)
                if interrupt.requested:
                    interrupted = True
                    break
            bar.close()
            if interrupted:
                break
            epoch_done = step // steps_per_epoch
            tested = ""
            for r in runs:
                result = _evaluate(r, data, cfg, device, memory_format)
                if result is not None:
                    r.tests.append({"epoch": epoch + 1, "step": step, **result})
                    tested = "test"
            print(f"epoch {epoch + 1}/{cfg.epochs} (step {step}/{total_steps}): " + " | ".join(
                f"{r.name}: train loss {r.epoch_loss / max(1, r.epoch_images):.4f} "
                f"acc {r.epoch_correct / max(1, r.epoch_images):.1%}" + (
                    f", test loss {r.tests[-1]['loss']:.4f} acc {r.tests[-1]['accuracy']:.1%}"
                    if tested else ", no test images") for r in runs), flush=True)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, state(epoch_done))
                saved_step = step
            if interrupt.requested:
                interrupted = True
            epoch += 1

    if interrupted:
        path = ckpt_path or out / "checkpoint.pt"
        save_checkpoint(path, state(step // steps_per_epoch))
        print(f"interrupted at step {step}/{total_steps}: checkpoint saved to {path}; continue "
              f"with: python -m resnet_fast train --resume {path}", file=sys.stderr, flush=True)
        _write_outputs(runs, out, cfg, device, backend)
        return 130
    if ckpt_path is not None and saved_step != step:
        save_checkpoint(ckpt_path, state(step // steps_per_epoch))
    _write_outputs(runs, out, cfg, device, backend)
    if ckpt_path is not None:
        print(f"checkpoint: {ckpt_path} (step {step})")
    return 0


def _write_outputs(runs: list, out: Path, cfg: Config, device: str, backend: str) -> None:
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "epoch", "loss", "accuracy", "lr", "images_per_s"])
        for r in runs:
            for h in r.history:
                w.writerow([r.name, h["step"], h["epoch"], h["loss"], h["accuracy"], h["lr"],
                            h["images_per_s"]])
    summary = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in dataclasses.asdict(cfg).items()},
               "device": device, "fused_backend": backend, "steps": len(runs[0].history),
               "runs": {}}
    for r in runs:
        last = r.tests[-1] if r.tests else None
        summary["runs"][r.name] = {
            "model": "resnet_fast.models" if r.name == "fused" else "resnet_fast.reference",
            "final_test_accuracy": last["accuracy"] if last else None,
            "final_test_loss": last["loss"] if last else None,
            "final_train_loss": r.history[-1]["loss"] if r.history else None,
            "images_per_s": r.images_per_s(), "tests": r.tests}
    lines = []
    for r in runs:
        s = summary["runs"][r.name]
        acc = (f"final test accuracy {s['final_test_accuracy']:.1%} (loss "
               f"{s['final_test_loss']:.4f})" if s["final_test_accuracy"] is not None
               else "not evaluated")
        ips = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "images/s n/a"
        what = f"{s['model']}, backend {backend}" if r.name == "fused" else s["model"]
        lines.append(f"  {r.name:5} ({what}): {acc}, {ips}")
    if len(runs) > 1:
        f_ips, e_ips = runs[0].images_per_s(), runs[1].images_per_s()
        ratio = f_ips / e_ips if f_ips and e_ips else None
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(runs[0].history, runs[1].history)]
        summary["images_per_s_ratio_fused_vs_eager"] = ratio
        summary["max_train_loss_difference"] = max(diffs) if diffs else None
        summary["first_step_loss_difference"] = diffs[0] if diffs else None
        lines.append("  fused / eager images/s: " + (f"{ratio:.2f}x" if ratio else "n/a"))
        if diffs:
            lines.append(f"  training loss, |fused - eager|: first step {diffs[0]:.2e}, "
                         f"largest {max(diffs):.2e}")
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    written = ["history.csv", "summary.json"]
    if _plot(runs, out / "loss_curve.png", cfg):
        written.append("loss_curve.png")
    print("summary\n" + "\n".join(lines))
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def _plot(runs: list, path: Path, cfg: Config) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not runs[0].history:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps = [h["step"] for h in r.history]
        losses = [h["loss"] for h in r.history]
        ax.plot(steps, losses, label=f"{r.name} (train loss)", linewidth=1,
                linestyle="-" if r.name == "fused" else "--")
        if r.tests:
            ax.plot([t["step"] for t in r.tests], [t["loss"] for t in r.tests], marker="o",
                    linestyle="none", label=f"{r.name} (test loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"{cfg.model} on {cfg.data}, batch {cfg.batch}, lr {cfg.lr} ({cfg.schedule})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

