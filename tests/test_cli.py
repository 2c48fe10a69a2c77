"""The command line end to end, in subprocesses as a user runs it: `python -m resnet_fast
verify | info | bench | train`, each with tiny settings, and bad input (exit status 2, one line
on stderr, no traceback)."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from resnet_fast.verify import OPS

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    # tests/conftest.py turns Triton's interpreter on for the tests in this process; the
    # command line runs as a user's would.
    env.pop("TRITON_INTERPRET", None)
    # One thread per process: the tests' models are tiny, and on a busy machine two OpenMP
    # threads waiting on each other are several times slower than one.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "resnet_fast", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout, cwd=ROOT)


def test_verify_prints_a_table_and_passes(tmp_path):
    out = tmp_path / "verify.json"
    res = _run("verify", "--device", "cpu", "--backend", "cpu", "--shapes", "2",
               "--dtypes", "float32", "bfloat16", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:6] == ["op", "backend", "dtype", "layout", "shape", "mode"]
    # ops x 2 dtypes x 2 layouts x 2 shapes x (train, eval)
    n = len(OPS) * 16
    assert lines[-1] == f"{n} passed, 0 failed"
    rows = json.loads(out.read_text())
    assert len(rows) == n and all(r["passed"] for r in rows)


def test_verify_bad_usage_exits_2():
    res = _run("verify", "--backend", "tpu")
    assert res.returncode == 2 and "invalid choice: 'tpu'" in res.stderr
    res = _run("verify", "--device", "cpu", "--backend", "cuda")
    assert res.returncode == 2 and "backend 'cuda' is not available on cpu" in res.stderr


def test_verify_on_a_models_layer_shapes(tmp_path):
    out = tmp_path / "verify.json"
    res = _run("verify", "--device", "cpu", "--backend", "cpu", "--model", "resnet18",
               "--size", "32", "--ops", "conv_bn_relu", "batch_norm_add_relu",
               "--dtypes", "float32", "--layouts", "channels_last", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    layers = {r["layer"] for r in rows}
    # the small-input stem at 32x32, every block end, a downsampling shortcut
    assert {"conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2"} <= layers
    assert any(r["op"] == "batch_norm_add_relu" for r in rows)
    assert any(r.get("conv") == "->128 k1s2p0 noact" for r in rows)
    assert res.stdout.splitlines()[-1] == f"{len(rows)} passed, 0 failed"


def test_info(tmp_path):
    out = tmp_path / "info.json"
    res = _run("info", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(out.read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) >= {"python", "torch", "triton", "resnet_fast"}
    assert info["backends"]["cpu"]["backends"]["reference"] == "available"
    # an unavailable backend says why
    assert info["backends"]["cpu"]["backends"]["cuda"].startswith("unavailable: ")
    assert "with_cuda" in info["extension"]["flags"]
    for word in ("versions", "backends", "with_cuda", "cpu"):
        assert word in res.stdout


def test_bn_act_benchmark_every_mode(tmp_path):
    """benchmarks/bench_bn_act.py in every mode on a tiny shape; in `bwd`, the graph built once
    and replayed keeps its own running statistics while the other providers update theirs."""
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_bn_act.py", "--modes", "train,fwd,bwd,eval",
         "--providers", "eager,cpu", "--layouts", "channels_last", "--shapes", "2x8x4x4",
         "--reps", "1", "--warmup", "1", "--min-run-time", "0", "--out", str(tmp_path),
         "--tag", "t"], capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = list(csv.DictReader(open(tmp_path / "bn_act_t.csv")))
    timed = {(r["op"], r["mode"], r["provider"]) for r in rows if float(r["median_ms"]) > 0}
    assert timed >= {(op, mode, provider) for op in ("batch_norm_relu", "batch_norm_add_relu")
                     for mode in ("train", "fwd", "bwd", "eval")
                     for provider in ("eager", "cpu")}


def test_bench_quick(tmp_path):
    res = _run("bench", "--quick", "--device", "cpu", "--model", "resnet18", "--size", "64x64",
               "--batch", "2", "--warmup", "0", "--reps", "2", "--compare", "eager,fused",
               "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    for suffix in ("csv", "json", "png"):
        assert (tmp_path / f"model_cpu_quick.{suffix}").is_file()
    rows = list(csv.DictReader(open(tmp_path / "model_cpu_quick.csv")))
    assert [r["provider"] for r in rows] == ["eager", "fused"]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert float(r["images_per_s"]) > 0 and float(r["saved_mb"]) > 0
        assert r["device"] and r["torch"] == torch.__version__
        assert (r["model"], r["mode"], r["layout"], r["batch"], r["size"]) == (
            "resnet18", "train", "channels_last", "2", "64x64")
    assert rows[1]["backend"] == "cpu"
    data = json.loads((tmp_path / "model_cpu_quick.json").read_text())
    assert data["settings"]["reps"] == 2 and len(data["rows"]) == 2
    assert "images/s" in res.stdout


def _train(tmp_path, *args, name="run"):
    out = tmp_path / name
    res = _run("train", "--device", "cpu", "--out", str(out), *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res, out, json.loads((out / "summary.json").read_text())


def test_train_digits_compare_eager_then_resume(tmp_path):
    ckpt = tmp_path / "ck" / "digits.pt"
    res, out, summary = _train(tmp_path, "--data", "digits", "--size", "8", "--batch", "16",
                               "--max-steps", "2", "--compare-eager", "--checkpoint",
                               str(ckpt))
    assert (out / "loss_curve.png").is_file() and ckpt.is_file()
    runs = summary["runs"]
    assert set(runs) == {"fused", "eager"} and summary["steps"] == 2
    for r in runs.values():
        assert 0 <= r["final_test_accuracy"] <= 1 and r["images_per_s"] > 0
    assert summary["images_per_s_ratio_fused_vs_eager"] > 0
    # the same initial weights and the same first batch: the same first loss
    assert summary["first_step_loss_difference"] < 1e-3
    assert "fused / eager images/s" in res.stdout
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 2 and set(saved["runs"]) == {"fused", "eager"}
    assert {"model", "optimizer", "scheduler"} <= set(saved["runs"]["fused"])
    assert not [p for p in ckpt.parent.iterdir() if p.name != ckpt.name]  # no temp files left

    res, out, summary = _train(tmp_path, "--resume", str(ckpt), "--max-steps", "3",
                               "--checkpoint", str(ckpt), name="resumed")
    assert "resuming at step 2" in res.stdout
    assert summary["steps"] == 3 and summary["config"]["compare_eager"]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 3
    # the optimizer and scheduler continued: 3 momentum steps, the cosine schedule at step 3
    assert saved["runs"]["fused"]["scheduler"]["last_epoch"] == 3
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "history.csv"))
             if r["model"] == "fused"]
    assert steps == [1, 2, 3]


def test_train_fake(tmp_path):
    res, out, summary = _train(tmp_path, "--data", "fake", "--size", "8", "--batch", "4",
                               "--fake-samples", "8", "--schedule", "step")
    assert summary["steps"] == 2 and list(summary["runs"]) == ["fused"]
    assert (out / "history.csv").is_file()
    assert "epoch 1/1" in res.stdout


def test_train_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for c, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12 + i, 10), color).save(root / c / f"{i}.png")
    res, out, summary = _train(tmp_path, "--data", f"folder:{root}", "--size", "8",
                               "--batch", "3", "--max-steps", "2")
    assert summary["steps"] == 2
    assert "2 classes" in res.stdout and "8x8" in res.stdout


def test_train_ctrl_c_saves_a_checkpoint(tmp_path):
    ckpt = tmp_path / "interrupted.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_fast", "train", "--device", "cpu", "--data", "digits",
         "--size", "8", "--batch", "16", "--out", str(tmp_path / "run"), "--checkpoint",
         str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        cwd=ROOT)
    try:
        first = proc.stdout.readline()  # printed once the Ctrl-C handler is in place
        assert first.startswith("training"), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "checkpoint saved to" in stderr and "--resume" in stderr
    saved = torch.load(ckpt, weights_only=True)
    # Interrupted mid-run: the signal may land before the first step ends (step 0), never
    # after the last (89 steps).
    assert 0 <= saved["step"] < 89


def _bad_input_cases(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cases = [
        (["train", "--model", "resnet19"], "resnet50"),
        (["bench", "--model", "resnet19"], "resnet50"),
        (["train", "--device", "cpu", "--backend", "tpu"], "reference"),
        (["train", "--device", "cpu", "--backend", "cuda"], "not available on cpu"),
        (["bench", "--dtype", "float8"], "bfloat16"),
        (["bench", "--device", "tpu"], "cpu, cuda"),
        (["bench", "--compare", "eager,jit"], "compile"),
        (["bench", "--device", "cpu", "--size", "16x16"], "at least 32"),
        (["train", "--device", "cpu", "--size", "4"], "at least 8"),
        (["train", "--device", "cpu", "--data", "mnist"], "digits, fake, folder:PATH"),
        (["train", "--device", "cpu", "--data", f"folder:{tmp_path / 'nowhere'}"],
         "does not exist"),
        (["train", "--device", "cpu", "--resume", str(tmp_path / "missing.pt")],
         "no such checkpoint"),
        (["train", "--device", "cpu", "--resume", str(blocker)], "not a readable checkpoint"),
        (["train", "--device", "cpu", "--out", str(blocker / "sub")], "cannot write"),
        (["bench", "--device", "cpu", "--out", str(blocker / "sub")], "cannot write"),
    ]
    if not torch.cuda.is_available():
        cases += [(["train", "--device", "cuda"], "valid here: cpu"),
                  (["bench", "--device", "cuda"], "valid here: cpu")]
    return cases


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = _bad_input_cases(tmp_path)
    cwd = tmp_path / "cwd"  # where default output folders would appear
    cwd.mkdir()
    # in parallel: each process only starts, parses and stops
    procs = [(args, expected, subprocess.Popen(
        [sys.executable, "-m", "resnet_fast", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)) for args, expected in cases]
    failures = []
    for args, expected, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        if not (proc.returncode == 2 and len(lines) == 1 and expected in lines[0]
                and "Traceback" not in stderr):
            failures.append(f"{args}: exit {proc.returncode}, stderr {stderr!r}")
    assert not failures, "\n".join(failures)
    assert not list(cwd.iterdir()), "bad input left files behind"


def test_benchmark_suite_collects_and_runs():
    """`pytest benchmarks --benchmark-only` finds every benchmark; one runs (untimed)."""
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
           "--benchmark-disable", "-k", "test_op and batch_norm_relu and eval and eager"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout


def test_verify_a_model_from_module_callable(tmp_path):
    """`verify --model module:callable` as a user runs it: a timm-style ResNet built by a
    callable of the tests, converted and compared with itself unconverted."""
    out = tmp_path / "model.json"
    env = _env()
    env["PYTHONPATH"] = str(ROOT / "tests")
    res = subprocess.run([sys.executable, "-m", "resnet_fast", "verify", "--model",
                          "test_fx_convert:tiny_resnet26t", "--input", "2x3x16x16", "--backend",
                          "cpu", "--dtypes", "float64", "--json", str(out)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BatchNorm layers inside fused ops: 17/18 in eval, 17/18 in training" in res.stdout
    rows = json.loads(out.read_text())
    assert rows and all(r["passed"] for r in rows)
    assert {"logits (eval)", "loss (train)"} <= {r["quantity"] for r in rows}
