"""`train --data cifar10:PATH / cifar100:PATH` on tiny directories in the CIFAR python format
(pickled dicts of uint8 N x 3072 rows and label lists, as the real batches are written): a
training epoch, the defaults, the augmentation and normalisation, and bad directories (one line,
exit status 2)."""

import argparse
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from resnet_fast.cli import UsageError
from resnet_fast.cli.train import add_arguments
from resnet_fast.cli.train_config import resolve_config
from resnet_fast.cli.train_data import CIFAR, batch_generator, cifar_data, random_crop_flip
from resnet_fast.cli.train_loop import EpochBatches
from test_cli import ROOT, _env, _run


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root, kind="cifar10", per_file=8, seed=0):
    """A CIFAR-10 (5 training batches) or CIFAR-100 (one training file) directory of random
    images, ``per_file`` a file, with bytes keys as in the original Python 2 pickles."""
    spec = CIFAR[kind]
    classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in spec["train"] + spec["test"]:
        _pickle(root / name, {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            spec["labels"].encode(): [int(v) for v in rng.integers(0, classes, per_file)]})
    _pickle(root / spec["meta"], {spec["names"].encode(): [f"class{i}".encode()
                                                          for i in range(classes)]})
    return root


def _train(tmp_path, data, *args):
    out = tmp_path / "run"
    res = _run("train", "--device", "cpu", "--data", data, "--out", str(out), *args,
               timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("kind, train, test, classes", [("cifar10", 40, 8, 10),
                                                        ("cifar100", 24, 24, 100)])
def test_cifar_trains_an_epoch(tmp_path, kind, train, test, classes):
    root = write_cifar(tmp_path / kind, kind, per_file=8 if kind == "cifar10" else 24)
    res, summary = _train(tmp_path, f"{kind}:{root}", "--size", "8", "--batch", "8")
    assert f"{train} train / {test} test images, {classes} classes, 8x8" in res.stdout
    assert "small-input stem" in res.stdout
    run = summary["runs"]["fused"]
    assert summary["steps"] == train // 8
    assert math.isfinite(run["final_train_loss"]) and math.isfinite(run["final_test_loss"])
    assert 0 <= run["final_test_accuracy"] <= 1


def _config(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_config(parser.parse_args(list(argv)), None)


def test_cifar_defaults_to_32x32_and_the_small_input_stem():
    cfg = _config("--data", "cifar10:somewhere")
    assert cfg.size == (32, 32) and cfg.small_input
    assert _config("--data", "cifar100:x", "--size", "64").small_input  # CIFAR at any size
    assert not _config("--data", "fake", "--size", "64").small_input
    assert not _config("--data", "cifar10:x", "--size", "64", "--no-small-input").small_input


def test_normalised_with_the_training_set_and_resized(tmp_path):
    data = cifar_data("cifar10", str(write_cifar(tmp_path / "c")), (16, 16))
    assert data.classes == [f"class{i}" for i in range(10)]
    x, y = data.batch("train", torch.arange(data.train_len))
    assert x.shape == (40, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    x32 = (data.splits["train"][0].float() / 255 - data.mean) / data.std
    assert torch.allclose(x32.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x32.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_random_crop_flip_is_a_padded_crop_seeded_per_step_and_process():
    x = torch.randint(1, 256, (16, 3, 6, 5), dtype=torch.uint8)  # no zeros: padding shows
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for image, source in zip(out, padded):
        crops = [(source[:, dy:dy + 6, dx:dx + 5], flip) for dy in range(5) for dx in range(5)
                 for flip in (False, True)]
        found = [flip for crop, flip in crops
                 if torch.equal(image, crop.flip(-1) if flip else crop)]
        assert found, "not a crop of the padded image"
        flips += found[0]
    assert 0 < flips < 16

    def augmented(step, rank):
        return random_crop_flip(x, 4, batch_generator(0, step, rank))
    assert torch.equal(augmented(3, 1), augmented(3, 1))
    assert not torch.equal(augmented(3, 0), augmented(3, 1))
    assert not torch.equal(augmented(3, 0), augmented(4, 0))


def test_workers_make_the_same_batches(tmp_path):
    from torch.utils.data import DataLoader

    data = cifar_data("cifar10", str(write_cifar(tmp_path / "c")), (32, 32))
    batches = EpochBatches(data, list(torch.arange(40).split(8)), step=7, seed=0, rank=1)
    made = [list(DataLoader(batches, batch_size=None, num_workers=w)) for w in (0, 1)]
    for (x0, y0), (x1, y1) in zip(*made):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x, _ = batches[0]
    assert not torch.equal(x, data.batch("train", torch.arange(8))[0])  # augmented


def _bad_directories(tmp_path):
    """(spec, expected part of the message) for broken CIFAR directories."""
    cases = [("cifar10:" + str(tmp_path / "nowhere"), "no such directory"),
             ("cifar10:", "needs a path")]

    def broken(name, edit, kind="cifar10"):
        root = write_cifar(tmp_path / name, kind, per_file=4)
        edit(root)
        return f"{kind}:{root}"

    def batch(**entries):
        return lambda root: _pickle(root / "data_batch_2", entries)
    good = np.zeros((4, 3072), np.uint8)
    cases += [
        (broken("missing", lambda r: (r / "data_batch_3").unlink()), "data_batch_3 is missing"),
        (broken("nometa", lambda r: (r / "batches.meta").unlink()), "batches.meta is missing"),
        (broken("garbage", lambda r: (r / "test_batch").write_bytes(b"not a pickle")),
         "is not a CIFAR batch (a pickled dict)"),
        (broken("list", lambda r: _pickle(r / "test_batch", [1, 2])), "holds a list"),
        (broken("nodata", batch(labels=[0, 1, 2, 3])), "has no 'data' entry"),
        (broken("nolabels", batch(data=good)), "has no 'labels' entry"),
        (broken("shape", batch(data=np.zeros((4, 1024), np.uint8), labels=[0] * 4)),
         "'data' is a uint8 array of shape 4x1024; expected a uint8 array of N x 3072"),
        (broken("dtype", batch(data=good.astype(np.float32), labels=[0] * 4)),
         "float32 array of shape 4x3072"),
        (broken("count", batch(data=good, labels=[0] * 3)), "is not 4 integer labels"),
        (broken("range", batch(data=good, labels=[0, 1, 2, 10])), "outside 0..9"),
        (broken("code", lambda r: (r / "test_batch").write_bytes(
            b"cos\nsystem\n(S'touch " + str(tmp_path / "ran").encode() + b"'\ntR.")),
         "it refers to os.system"),
        # a CIFAR-10 batch in a CIFAR-100 directory: no fine labels
        (broken("coarse", lambda r: _pickle(r / "train", {b"data": good, b"labels": [0] * 4}),
                kind="cifar100"), "has no 'fine_labels' entry"),
    ]
    return cases


def test_bad_directories_are_one_line(tmp_path):
    for spec, expected in _bad_directories(tmp_path):
        kind, _, path = spec.partition(":")
        with pytest.raises(UsageError) as err:
            cifar_data(kind, path, (32, 32))
        assert expected in str(err.value) and "\n" not in str(err.value), (spec, err.value)
    assert not (tmp_path / "ran").exists()  # the unpickler ran nothing


def test_bad_directories_exit_2(tmp_path):
    cases = [c for c in _bad_directories(tmp_path)
             if any(s in c[1] for s in ("no such directory", "is missing", "'data' entry",
                                        "shape 4x1024"))]
    procs = [(spec, expected, subprocess.Popen(
        [sys.executable, "-m", "resnet_fast", "train", "--device", "cpu", "--data", spec,
         "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=_env(), cwd=ROOT)) for spec, expected in cases]
    failures = []
    for spec, expected, proc in procs:
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        lines = stderr.strip().splitlines()
        if not (proc.returncode == 2 and len(lines) == 1 and expected in lines[0]):
            failures.append(f"{spec}: exit {proc.returncode}, stderr {stderr!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out").exists()
