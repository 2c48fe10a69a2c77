"""`train` in two processes on the CPU (gloo, rendezvous on 127.0.0.1): `--nproc-per-node 2`
and a process that torchrun itself starts, resuming (with the same number of processes only),
and a process that dies or hangs making every process stop within a bounded time.

Every subprocess has a timeout, and each test ends the processes it started (found by a marker
in their environment), so no test can hang.
"""

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

import resnet_fast
from resnet_fast.cli.train_config import Config
from resnet_fast.cli.train_data import epoch_batches, steps_per_epoch
from resnet_fast.cli.train_dist import free_port
from test_cifar_data import write_cifar
from test_cli import ROOT, _env, _run

FAKE = ("--data", "fake", "--size", "8", "--batch", "4")


def _train(tmp_path, *args, name="run", nproc=2):
    out = tmp_path / name
    res = _run("train", "--device", "cpu", "--out", str(out), *args,
               *(("--nproc-per-node", str(nproc)) if nproc > 1 else ()), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res, out, json.loads((out / "summary.json").read_text())


def _cfg(batch):
    return Config(model="resnet18", data="fake", size=(8, 8), small_input=True, epochs=1,
                  batch=batch, lr=0.1, momentum=0.9, weight_decay=0, schedule="cosine", seed=3,
                  compare_eager=False, amp=False, amp_dtype=None, fake_samples=8,
                  test_fraction=0.2, sync_bn=False)


@pytest.mark.parametrize("n", [36, 37, 40, 41, 43, 45])
def test_processes_share_the_steps_of_one_process(n):
    """World 3 x batch 4: process r's r-th share of each step of one process's batch 12."""
    one = epoch_batches(_cfg(12), n, epoch=2)
    shares = [epoch_batches(_cfg(4), n, epoch=2, rank=r, world=3) for r in range(3)]
    # 40 = 3 x 12 + 4: a last step of 4 is dropped (fewer than 2 a process); 43: 3, 2, 2
    assert len(one) - (2 <= n % 12 < 6) == len(shares[0]) == steps_per_epoch(_cfg(4), n, 3)
    for step, parts in enumerate(zip(*shares)):
        assert torch.equal(torch.cat(parts), one[step])
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 2
    assert steps_per_epoch(_cfg(12), n) == len(one)


def test_two_processes_then_resume_with_two_only(tmp_path):
    ckpt = tmp_path / "ck.pt"
    res, out, summary = _train(tmp_path, *FAKE, "--fake-samples", "16", "--epochs", "2",
                               "--max-steps", "1", "--checkpoint", str(ckpt))
    assert "batch 4 a process, 2 processes (gloo)" in res.stdout
    assert res.stdout.count("training resnet18") == 1  # rank 0 only
    assert summary["processes"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 1
    saved = torch.load(ckpt, weights_only=True)
    # 16 images in steps of 2 x 4: 2 steps an epoch
    assert saved["world_size"] == 2 and saved["steps_per_epoch"] == 2
    assert len(saved["rank_rng"]) == 2
    assert not torch.equal(saved["rank_rng"][0]["torch"], saved["rank_rng"][1]["torch"])

    res, out, summary = _train(tmp_path, "--resume", str(ckpt), "--checkpoint", str(ckpt),
                               name="resumed")
    assert "resuming at step 1/4" in res.stdout
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "history.csv"))]
    assert steps == [1, 2, 3, 4]

    procs = [subprocess.Popen([sys.executable, "-m", "resnet_fast", "train", "--device", "cpu",
                               "--resume", str(ckpt), "--out", str(tmp_path / "no"), *nproc],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT)
             for nproc in ((), ("--nproc-per-node", "3"))]
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, stderr
        assert "was trained by 2 process(es)" in lines[0] and "--nproc-per-node 2" in lines[0]



def test_cifar_in_processes_torchrun_starts(tmp_path):
    root = write_cifar(tmp_path / "cifar", per_file=8)
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "resnet_fast",
         "train", "--device", "cpu", "--data", f"cifar10:{root}", "--size", "8", "--batch",
         "4", "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=ROOT,
        timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "40 train / 8 test images, 10 classes" in res.stdout and "2 processes" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["processes"] == 2
    assert math.isfinite(summary["runs"]["fused"]["final_test_loss"])


def _processes(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes whose environment holds ``marker``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"TEST_MARKER") == marker.encode() and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def _start_long_run(tmp_path, *args):
    """A 2-process run long enough to be stopped in the middle, once rank 0 is training."""
    marker = uuid.uuid4().hex
    env = dict(_env(), TEST_MARKER=marker)
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_fast", "train", "--device", "cpu", *FAKE,
         "--fake-samples", "20000", "--nproc-per-node", "2", "--out", str(tmp_path / "run"),
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    first = proc.stdout.readline()  # rank 0, after the process group and DDP are up
    assert first.startswith("training"), first + proc.stderr.read()
    ranks = _processes(marker)
    assert set(ranks) == {0, 1}, ranks
    return proc, marker, ranks


def _end(proc, marker):
    """Kills what is left of a run (the launcher and its processes)."""
    for pid in _processes(marker).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the processes in /proc")
def test_a_killed_process_stops_all(tmp_path):
    proc, marker, ranks = _start_long_run(tmp_path)
    try:
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        _end(proc, marker)
    assert proc.returncode == 1
    assert "train: process 1 of 2 was killed by SIGKILL" in stderr
    assert not _processes(marker)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the processes in /proc")
def test_ctrl_c_stops_every_process_after_the_same_step(tmp_path):
    ckpt = tmp_path / "interrupted.pt"
    proc, marker, _ = _start_long_run(tmp_path, "--checkpoint", str(ckpt))
    try:
        time.sleep(2)  # rank 0 prints its first line just before rank 1 handles Ctrl-C too
        proc.send_signal(signal.SIGINT)  # to torchrun, which passes it on to each process
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        _end(proc, marker)
    assert proc.returncode == 130, stdout + stderr
    assert "checkpoint saved to" in stderr and "--nproc-per-node 2" in stderr
    saved = torch.load(ckpt, weights_only=True)
    assert saved["world_size"] == 2 and 1 <= saved["step"] < 5000


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the processes in /proc")
def test_a_hung_process_times_out(tmp_path):
    proc, marker, ranks = _start_long_run(tmp_path, "--dist-timeout", "3")
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.monotonic()
        while os.path.exists(f"/proc/{ranks[0]}") and time.monotonic() - start < 60:
            with open(f"/proc/{ranks[0]}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
            time.sleep(0.2)
        waited = time.monotonic() - start
        os.kill(ranks[1], signal.SIGCONT)  # so torchrun's SIGTERM ends it at once
        _, stderr = proc.communicate(timeout=60)
    finally:
        _end(proc, marker)
    assert waited < 30, f"rank 0 still running {waited:.0f} s after rank 1 stopped"
    assert proc.returncode == 1
    assert "train: process 0 of 2 exited with status 1" in stderr, stderr
    # gloo's error: "Timed out waiting 3000ms for recv", or "Application timeout caused pair
    # closure"
    assert any(s in stderr.lower() for s in ("timed out", "timeout")), stderr


@pytest.mark.skipif(not hasattr(resnet_fast, "convert_sync_batchnorm"),
                    reason="resnet_fast.convert_sync_batchnorm is not there yet")
def test_two_processes_step_as_one_on_the_whole_batch(tmp_path):
    """With --sync-bn, 2 processes of 4 images train as one process on the 8: the same loss at
    the first step and, DDP having averaged the gradients, at the second."""
    args = ("--data", "fake", "--size", "8", "--fake-samples", "16", "--max-steps", "2")
    _, one, _ = _train(tmp_path, *args, "--batch", "8", name="one", nproc=1)
    _, two, _ = _train(tmp_path, *args, "--batch", "4", "--sync-bn", name="two")
    losses = [[float(r["loss"]) for r in csv.DictReader(open(out / "history.csv"))]
              for out in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
