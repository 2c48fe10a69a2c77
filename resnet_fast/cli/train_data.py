"""The data of ``python -m resnet_fast train`` (``--data``): loaders, augmentation, and each
process's share of an epoch's batches.

A :class:`Data` holds a train and a test split and gives batches of float32 NCHW images and
int64 labels on the CPU. The CIFAR batches are read with a restricted unpickler that builds
numpy arrays, lists and strings only, so a file that is not a CIFAR batch cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

from resnet_fast.cli import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DATA_CHOICES = "digits, fake, folder:PATH, cifar10:PATH, cifar100:PATH"

# The files of the CIFAR "python version" directories (cifar-10-batches-py, cifar-100-python).
CIFAR = {
    "cifar10": dict(title="CIFAR-10", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", labels="labels",
                    names="label_names"),
    "cifar100": dict(title="CIFAR-100", train=["train"], test=["test"], meta="meta",
                     labels="fine_labels", names="fine_label_names"),
}
CIFAR_SIDE = 32
CIFAR_PADDING = 4  # of the random crop


class Data:
    """A train and a test split; ``batch(split, indices, generator)`` gives float32 NCHW images
    and int64 labels on the CPU. ``generator`` (a ``torch.Generator``, training batches only)
    drives random augmentation, which only CIFAR has; None: no augmentation."""

    name: str
    classes: list
    train_len: int
    test_len: int

    def batch(self, split: str, indices, generator=None):
        raise NotImplementedError


class TensorData(Data):
    def __init__(self, name, classes, train, test):
        self.name, self.classes = name, classes
        self.splits = {"train": train, "test": test}
        self.train_len, self.test_len = len(train[1]), len(test[1])

    def batch(self, split, indices, generator=None):
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

    def batch(self, split, indices, generator=None):
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


class CifarData(TensorData):
    """CIFAR images, kept as uint8 NCHW. A training batch given a generator is augmented: a
    random 32x32 crop of the image padded by 4 zero (black) pixels on each side, and a
    horizontal flip of half the images. Both splits are normalised per channel with the mean
    and standard deviation of the training images (on CIFAR-10: mean 0.4914, 0.4822, 0.4465,
    std 0.2470, 0.2435, 0.2616) and resized (bilinear) to ``size`` when it is not 32x32."""

    def __init__(self, name, classes, train, test, size):
        super().__init__(name, classes, train, test)
        self.size = tuple(size)
        self.mean, self.std = _channel_stats(train[0])

    def batch(self, split, indices, generator=None):
        import torch.nn.functional as F

        x, y = super().batch(split, indices)
        if generator is not None:
            x = random_crop_flip(x, CIFAR_PADDING, generator)
        x = (x.float() / 255 - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=True)
        return x, y


def _channel_stats(images):
    """Per-channel mean and standard deviation of uint8 NCHW ``images`` in [0, 1], as
    (1, C, 1, 1) float32 tensors; summed in float64, a few thousand images at a time."""
    import torch

    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        chunk = chunk.double() / 255
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def random_crop_flip(x, padding: int, generator):
    """``x`` (N, C, H, W), each image cropped at a random offset from itself padded with
    ``padding`` zeros on each side, and flipped left-right with probability 1/2."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)
    cols = dx + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


class _CifarUnpickler(pickle.Unpickler):
    """Builds what a CIFAR batch holds (dicts, lists, strings, numpy arrays) and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        if module.startswith("numpy."):  # numpy 1 pickles name numpy.core, numpy 2 numpy._core
            import numpy

            module = ("numpy._core" if hasattr(numpy, "_core") else "numpy.core") + ".multiarray"
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path, keys: tuple[str, ...]) -> list:
    """The entries ``keys`` of the pickled dict at ``path`` (keys as str or, as the original
    Python 2 pickles have them, bytes)."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure: not a CIFAR file
        raise UsageError(f"{str(path)!r} is not a CIFAR batch (a pickled dict): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise UsageError(f"{str(path)!r} is not a CIFAR batch: it holds a {type(d).__name__}, "
                         "not a dict")
    found = []
    for key in keys:
        value = d.get(key, d.get(key.encode()))
        if value is None:
            raise UsageError(f"{str(path)!r} is not a CIFAR batch: it has no {key!r} entry")
        found.append(value)
    return found


def _read_cifar_split(root: Path, files: list, labels_key: str, classes: int):
    import numpy as np
    import torch

    images, labels = [], []
    for name in files:
        path = root / name
        data, y = _read_cifar_pickle(path, ("data", labels_key))
        row = 3 * CIFAR_SIDE * CIFAR_SIDE
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == row):
            found = (f"{data.dtype} array of shape {'x'.join(map(str, data.shape))}"
                     if isinstance(data, np.ndarray) else type(data).__name__)
            raise UsageError(f"{str(path)!r}: 'data' is a {found}; expected a uint8 array of "
                             f"N x {row} (a 3x{CIFAR_SIDE}x{CIFAR_SIDE} image a row)")
        try:
            y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        except (TypeError, ValueError, OverflowError):
            y = None
        if y is None or y.shape != (len(data),):
            raise UsageError(f"{str(path)!r}: {labels_key!r} is not {len(data)} integer labels, "
                             f"one an image")
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < classes):
            raise UsageError(f"{str(path)!r}: labels {int(y.min())}..{int(y.max())} outside "
                             f"0..{classes - 1} (the meta file names {classes} classes)")
        images.append(torch.from_numpy(data).view(-1, 3, CIFAR_SIDE, CIFAR_SIDE))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def cifar_data(kind: str, path: str, size) -> Data:
    """``--data cifar10:PATH`` / ``cifar100:PATH``: the python version of CIFAR-10 (PATH holds
    ``data_batch_1`` to ``data_batch_5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``; the 100 fine labels)."""
    spec = CIFAR[kind]
    expected = (f"expected the {spec['title']} python version: "
                f"{', '.join(spec['train'] + spec['test'] + [spec['meta']])}")
    if not path:
        raise UsageError(f"--data {kind}: needs a path ({kind}:PATH); {expected}")
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise UsageError(f"--data {kind}:PATH needs numpy (pip install numpy)") from None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {kind}:{path}: no such directory; {expected}")
    for name in spec["train"] + spec["test"] + [spec["meta"]]:
        if not (root / name).is_file():
            raise UsageError(f"--data {kind}:{path}: {name} is missing; {expected}")
    names, = _read_cifar_pickle(root / spec["meta"], (spec["names"],))
    if not isinstance(names, list) or not names:
        raise UsageError(f"{str(root / spec['meta'])!r}: {spec['names']!r} is not a list of "
                         "class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train = _read_cifar_split(root, spec["train"], spec["labels"], len(classes))
    test = _read_cifar_split(root, spec["test"], spec["labels"], len(classes))
    return CifarData(f"{kind}:{path}", classes, train, test, size)


def default_size(data: str) -> tuple[int, int]:
    return (64, 64) if data.startswith("folder:") else (32, 32)


def default_small_input(data: str, size: tuple[int, int]) -> bool:
    """The small-input stem for CIFAR (32x32 images, whatever ``--size`` they are resized to)
    and for any size under 64."""
    return data.partition(":")[0] in CIFAR or max(size) < 64


def check_data_spec(data: str) -> str:
    if data in ("digits", "fake") or data.partition(":")[0] in ("folder", *CIFAR) and ":" in data:
        return data
    raise UsageError(f"unknown --data {data!r}; valid: {DATA_CHOICES}")


def load_data(cfg) -> Data:
    if cfg.data == "digits":
        return load_digits(cfg.size, cfg.seed, cfg.test_fraction)
    if cfg.data == "fake":
        return fake_data(cfg.size, cfg.seed, cfg.fake_samples)
    kind, _, path = cfg.data.partition(":")
    if kind in CIFAR:
        return cifar_data(kind, path, cfg.size)
    return folder_data(path, cfg.size, cfg.seed, cfg.test_fraction)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def derived_seed(seed: int, *keys) -> int:
    """A seed for one use of ``seed`` (``keys``: what for, which process, which step): the same
    in every run, unrelated between keys."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_generator(seed: int, step: int, rank: int):
    """The generator of the augmentation of step ``step``'s batch in process ``rank``: fixed by
    the three, so a resumed run augments as an uninterrupted one would."""
    import torch

    return torch.Generator().manual_seed(derived_seed(seed, "augment", step, rank))


def epoch_batches(cfg, n: int, epoch: int, rank: int = 0, world: int = 1):
    """Process ``rank``'s batches (index tensors) of one epoch of ``world`` processes.

    The epoch's order is a permutation fixed by the seed and the epoch (the same in every
    process, so a resumed run sees the same order), cut into steps of ``cfg.batch`` images per
    process; process ``rank`` takes the rank-th share of each step. A last step with fewer than
    2 images per process is dropped (BatchNorm cannot train on 1); in a shorter last step the
    shares differ by one image at most."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    steps = list(perm.split(cfg.batch * world))
    if len(steps[-1]) < 2 * world:
        steps.pop()
    return [s.tensor_split(world)[rank] for s in steps]


def steps_per_epoch(cfg, n: int, world: int = 1) -> int:
    full, rest = divmod(n, cfg.batch * world)
    return full + (1 if rest >= 2 * world else 0)


