"""`python -m resnet_fast verify` end to end, in a subprocess as a user runs it."""

import json
import os
import subprocess
import sys


def _run(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "resnet_fast", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_verify_prints_a_table_and_passes(tmp_path):
    out = tmp_path / "verify.json"
    res = _run("verify", "--device", "cpu", "--backend", "cpu", "--shapes", "2",
               "--dtypes", "float32", "bfloat16", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:6] == ["op", "backend", "dtype", "layout", "shape", "mode"]
    # 4 ops x 2 dtypes x 2 layouts x 2 shapes x (train, eval)
    assert lines[-1] == "64 passed, 0 failed"
    rows = json.loads(out.read_text())
    assert len(rows) == 64 and all(r["passed"] for r in rows)


def test_verify_bad_usage_exits_2():
    res = _run("verify", "--backend", "tpu")
    assert res.returncode == 2 and "invalid choice: 'tpu'" in res.stderr
    res = _run("verify", "--device", "cpu", "--backend", "cuda")
    assert res.returncode == 2 and "backend 'cuda' is not available on cpu" in res.stderr
