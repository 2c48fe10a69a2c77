"""Mutation check of the test suite: do the tests catch plausible bugs in the kernels?

Each mutant is one plausible bug in resnet_fast, written as an exact replacement in one file
(the old text must occur exactly once, so the list cannot silently stop applying), with the
focused test selection that should catch it. The working tree (with its uncommitted changes,
not git HEAD) is copied into a scratch directory; there each mutant is applied on its own, its
tests run (``pytest --maxfail=3 -q -p no:cacheprovider``, so a caught mutant stops early),
and the file is restored. Mutants in ``csrc/`` rebuild the extension in the scratch copy
(``setup.py build_ext --inplace --force``: the header bn_act_math.h is no listed source, so
setuptools would otherwise call the extension up to date), and the unmutated build is put back
after each. Before any mutant, every test selection must pass on the unmutated copy.

    .venv/bin/python benchmarks/mutants.py            # all mutants; writes results/mutants_cpu.json
    .venv/bin/python benchmarks/mutants.py --list     # the mutants, their files and tests
    .venv/bin/python benchmarks/mutants.py --only triton_pivot_not_added_back   # one, no JSON

Prints one row per mutant: its name, file, whether it was caught, and by which tests (the
first failing test ids and their count). Exits 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from resnet_fast.timing import provenance, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutants_cpu.json"
# Top-level entries of the working tree the scratch copy leaves out (the venv is used from
# ROOT; the extension is rebuilt in the copy only for csrc/ mutants).
EXCLUDED = {".venv", ".git", "build", ".hypothesis", ".pytest_cache"}
MAXFAIL = 3  # failures after which a mutant's run stops: enough ids to show what caught it
TEST_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1200


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files and a -k expression
    what: str

    @property
    def compiled(self) -> bool:
        return self.path.startswith("csrc/")


def _k(files: str, expression: str) -> tuple[str, ...]:
    return (*files.split(), "-k", expression)


BN_CPU_TRAIN = _k("tests/test_bn_act.py", "cpu and train")
BN_TRITON_TRAIN = _k("tests/test_bn_act.py", "triton and train")
BN_CPU_CMA = _k("tests/test_bn_act.py", "cpu and (None or cumulative)")
CONV_TRITON_TRAIN = _k("tests/test_conv_bn_act.py", "triton and train")

MUTANTS = (
    # ------------------------------------------------------------------ Python op layer
    Mutant("eval_fold_eps_placement", "resnet_fast/ops.py",
           "torch.stack([running_mean, torch.rsqrt(running_var + eps)])",
           "torch.stack([running_mean, 1 / (torch.sqrt(running_var) + eps)])",
           _k("tests/test_conv_bn_act.py", "cpu and eval"),
           "eval BatchNorm fold: 1 / (sqrt(var) + eps) for rsqrt(var + eps)"),
    Mutant("conv_running_var_biased", "resnet_fast/ops.py",
           "unbiased = var * (count / (count - 1))", "unbiased = var",
           CONV_TRITON_TRAIN, "conv running update without the m / (m - 1) Bessel factor"),
    Mutant("conv_momentum_swapped", "resnet_fast/ops.py",
           "torch.stack([(1 - momentum) * running_mean + momentum * mean,",
           "torch.stack([momentum * running_mean + (1 - momentum) * mean,",
           CONV_TRITON_TRAIN, "conv running mean update: momentum and 1 - momentum swapped"),
    Mutant("cma_factor_off_by_one", "resnet_fast/reference.py",
           "return 1.0 / (float(num_batches_tracked) + (0 if count else 1))",
           "return 1.0 / float(num_batches_tracked)",
           BN_CPU_CMA, "momentum=None: factor 1/n for the fused ops, which count the batch "
                       "after the update (1/(n+1))"),
    Mutant("num_batches_tracked_not_incremented", "resnet_fast/ops.py",
           "            counter.add_(1)", "            counter.add(1)",
           _k("tests/test_bn_act.py", "triton and (None or cumulative)"),
           "batch counter incremented out of place (result dropped)"),
    Mutant("frozen_batch_norm_updates_running_stats", "resnet_fast/nn.py",
           '"training": bn.training,', '"training": bn.training or torch.is_grad_enabled(),',
           _k("tests/test_models.py", "frozen"),
           "a BatchNorm in eval inside a training step uses and updates batch statistics"),
    Mutant("affine_fill_swapped", "resnet_fast/ops.py",
           "return param(weight, 1.0), param(bias, 0.0), None, None",
           "return param(weight, 0.0), param(bias, 1.0), None, None",
           _k("tests/test_bn_act.py", "triton and affine"),
           "weight=None/bias=None filled with each other's value (0 and 1)"),
    Mutant("residual_affine_swapped", "resnet_fast/ops.py",
           "param(residual_weight, 1.0),\n            param(residual_bias, 0.0))",
           "param(residual_bias, 1.0),\n            param(residual_weight, 0.0))",
           _k("tests/test_bn_act.py", "triton and dual"),
           "the residual BatchNorm's weight and bias swapped"),
    Mutant("deferred_relu_ignored", "resnet_fast/functional.py",
           "in_relu=deferred.relu) if deferred is not None",
           "in_relu=False) if deferred is not None",
           _k("tests/test_conv_bn_act.py", "cpu and deferred"),
           "a deferred input is normalised on load without its ReLU"),
    Mutant("prologue_drops_deferred_bias", "resnet_fast/ops.py",
           "in_scale, in_shift = _scale_shift(in_stats, in_weight, in_bias)",
           "in_scale, in_shift = _scale_shift(in_stats, in_weight, None)",
           _k("tests/test_conv_bn_act.py", "triton and deferred"),
           "the conv's input prologue normalises without the deferred BatchNorm's bias"),
    Mutant("deferred_stats_unbiased", "resnet_fast/ops.py",
           "save_stats = torch.stack([mean, torch.rsqrt(var + eps)])",
           "save_stats = torch.stack([mean, torch.rsqrt(var * (count / (count - 1)) + eps)])",
           _k("tests/test_conv_bn_act.py", "triton and (deferred or train)"),
           "the statistics a deferred (and backward) BatchNorm uses: unbiased variance"),
    Mutant("conv_bias_fold_unscaled", "resnet_fast/ops.py",
           "shift + conv_bias.to(scale.dtype) * scale", "shift + conv_bias.to(scale.dtype)",
           _k("tests/test_conv_bn_act.py", "cpu and eval"),
           "oneDNN eval fold: conv bias added to the shift without the BatchNorm scale"),
    Mutant("triton_conv_bias_fold_unscaled", "resnet_fast/ops.py",
           "shift + conv_bias.to(acc) * scale", "shift + conv_bias.to(acc)",
           _k("tests/test_conv_bn_act.py", "triton and eval"),
           "one-launch eval epilogue: conv bias not scaled by the BatchNorm"),
    # ------------------------------------------------------------------ Triton kernels
    Mutant("triton_running_var_biased", "resnet_fast/triton/bn_act.py",
           "new_var = (1.0 - mom) * old_var + mom * (var * m / (m - 1.0))",
           "new_var = (1.0 - mom) * old_var + mom * var",
           BN_TRITON_TRAIN, "running variance without the m / (m - 1) Bessel factor"),
    Mutant("triton_momentum_swapped", "resnet_fast/triton/bn_act.py",
           "new_mean = (1.0 - mom) * old_mean + mom * mean",
           "new_mean = mom * old_mean + (1.0 - mom) * mean",
           BN_TRITON_TRAIN, "running mean update: momentum and 1 - momentum swapped"),
    Mutant("triton_relu_mask_from_input", "resnet_fast/triton/bn_act.py",
           "g = tl.where(pre <= 0.0, 0.0, g)\n    return g, x, r\n",
           "g = tl.where(x <= 0.0, 0.0, g)\n    return g, x, r\n",
           _k("tests/test_bn_act.py", "triton"),
           "backward apply: ReLU mask from the BatchNorm input instead of the pre-activation"),
    Mutant("triton_residual_added_twice", "resnet_fast/triton/bn_act.py",
           "    if RESIDUAL_MODE == 1:\n        y += r\n",
           "    if RESIDUAL_MODE == 1:\n        y += r + r\n",
           _k("tests/test_bn_act.py", "triton and batch_norm_add_relu"),
           "block end: the plain residual added twice"),
    Mutant("triton_residual_scale_dropped_in_grad", "resnet_fast/triton/bn_act.py",
           "* r_mean_gxhat) * r_scale", "* r_mean_gxhat) * r_invstd",
           _k("tests/test_bn_act.py", "triton and dual"),
           "dual block end: the residual BatchNorm's weight dropped from its input gradient"),
    Mutant("triton_channels_last_channel_axis", "resnet_fast/triton/bn_act.py",
           "    if CHANNELS_LAST:\n        b = v[None, :]\n    else:\n        b = v[:, None]",
           "    if CHANNELS_LAST:\n        b = v[:, None]\n    else:\n        b = v[None, :]",
           _k("tests/test_bn_act.py", "triton and channels_last"),
           "per-channel constants broadcast along the wrong tile axis"),
    Mutant("triton_batch_invstd_without_eps", "resnet_fast/triton/bn_act.py",
           "invstd = _inv_sqrt(var + eps_c)", "invstd = _inv_sqrt(var)",
           BN_TRITON_TRAIN, "invstd = 1 / sqrt(var), eps dropped"),
    Mutant("triton_backward_centring_dropped", "resnet_fast/triton/bn_act.py",
           "        mean_g = sum_g / m\n", "        mean_g = tl.zeros_like(invstd)\n",
           BN_TRITON_TRAIN, "backward with batch statistics: mean_g = 0"),
    Mutant("triton_pivot_not_added_back", "resnet_fast/triton/bn_act.py",
           "mean = pivot + d.to(acc)", "mean = d.to(acc)",
           BN_TRITON_TRAIN, "batch mean from the shifted sums without the pivot"),
    # ------------------------------------------------------------------ C++ (rebuilt)
    Mutant("cpu_num_batches_tracked_not_incremented", "csrc/op_kernels.cpp",
           "if (counter.has_value()) counter->add_(1);",
           "if (counter.has_value()) counter->add(1);",
           BN_CPU_CMA, "batch counter incremented out of place (result dropped)"),
    Mutant("cpu_affine_fill_swapped", "csrc/op_kernels.cpp",
           'weight(affine_param(a.optional("weight"), C, 1.0, acc)),\n'
           '        bias(affine_param(a.optional("bias"), C, 0.0, acc)),',
           'weight(affine_param(a.optional("weight"), C, 0.0, acc)),\n'
           '        bias(affine_param(a.optional("bias"), C, 1.0, acc)),',
           _k("tests/test_bn_act.py", "cpu and affine"),
           "weight=None/bias=None filled with each other's value (0 and 1)"),
    Mutant("cpu_residual_affine_swapped", "csrc/op_kernels.cpp",
           'residual_weight(residual_param(a, "residual_weight", 1.0)),\n'
           '        residual_bias(residual_param(a, "residual_bias", 0.0))',
           'residual_weight(residual_param(a, "residual_bias", 1.0)),\n'
           '        residual_bias(residual_param(a, "residual_weight", 0.0))',
           _k("tests/test_bn_act.py", "cpu and dual"),
           "the residual BatchNorm's weight and bias swapped"),
    Mutant("cpu_running_var_biased", "csrc/bn_act_math.h",
           "const A unbiased = var * m / (m - A(1));", "const A unbiased = var;",
           BN_CPU_TRAIN, "bn_running_update without the m / (m - 1) Bessel factor"),
    Mutant("cpu_relu_mask_from_input", "csrc/cpu/bn_act.cpp",
           "  return relu_grad(pre_activation<kMode>(a, x, r, e, j, r_value), g);",
           "  pre_activation<kMode>(a, x, r, e, j, r_value);\n"
           "  return relu_grad(load_as<T>(x + e), g);",
           BN_CPU_TRAIN, "backward: ReLU mask from the BatchNorm input instead of the "
                         "pre-activation"),
    Mutant("cpu_batch_invstd_without_eps", "csrc/bn_act_math.h",
           "*invstd = static_cast<A>(1.0 / std::sqrt(v + static_cast<double>(eps)));",
           "*invstd = static_cast<A>(1.0 / std::sqrt(v));",
           BN_CPU_TRAIN, "bn_stats_from_shifted_sums: invstd = 1 / sqrt(var), eps dropped"),
    Mutant("cpu_backward_centring_dropped", "csrc/bn_act_math.h",
           "*mean_g = batch_stats ? sum_g / m : A(0);", "*mean_g = A(0);",
           BN_CPU_TRAIN, "bn_backward_coeffs: mean_g = 0 with batch statistics"),
    Mutant("cpu_pivot_not_added_back", "csrc/bn_act_math.h",
           "*mean = static_cast<A>(static_cast<double>(pivot) + d);",
           "*mean = static_cast<A>(d);",
           BN_CPU_TRAIN, "bn_stats_from_shifted_sums: mean without the pivot"),
)


def check_patterns(mutants, root: Path) -> None:
    """Fails unless every mutant's old text occurs exactly once in its file under ``root``."""
    stale = []
    for m in mutants:
        count = (root / m.path).read_text().count(m.old)
        if count != 1:
            stale.append(f"{m.name}: {m.path} has its pattern {count} times (needs 1):\n"
                         f"    {m.old!r}")
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        stale.append("mutant names are not unique")
    if stale:
        raise SystemExit("mutants.py: the mutant list no longer matches the code:\n"
                         + "\n".join(stale))


def make_scratch(root: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="resnet_fast_mutants_"))

    def ignore(directory, names):
        top = Path(directory) == root
        return {n for n in names if (top and n in EXCLUDED) or n == "__pycache__"}

    shutil.copytree(root, scratch / "tree", ignore=ignore, symlinks=True)
    return scratch / "tree"


def scratch_env(scratch: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file is never shadowed by a stale .pyc
    env["MAX_JOBS"] = env.get("MAX_JOBS", "2")
    return env


def check_imports_scratch(scratch: Path, env: dict) -> None:
    """resnet_fast and its extension must come from the scratch copy, not the editable install
    pointing at the working tree."""
    out = subprocess.run(
        [sys.executable, "-c", "import resnet_fast, resnet_fast._C as c; "
         "print(resnet_fast.__file__); print(c.__file__)"],
        cwd=scratch, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(scratch.resolve()) for p in out):
        raise SystemExit(f"mutants.py: resnet_fast resolves to {out}, not the scratch copy "
                         f"{scratch}")


@dataclasses.dataclass
class TestRun:
    rc: int
    seconds: float
    ran: int  # tests executed (not skipped)
    failed: list[str]  # ids of failed or erroring tests, in order
    output_tail: str


def run_tests(scratch: Path, env: dict, selection: tuple[str, ...]) -> TestRun:
    report = scratch.parent / "junit.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", f"--maxfail={MAXFAIL}", "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", *selection]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True,
                              timeout=TEST_TIMEOUT_S)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = -1, f"timed out after {TEST_TIMEOUT_S} s: {exc}"
    seconds = time.perf_counter() - start
    ran, failed = 0, []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("skipped") is not None:
                continue
            ran += 1
            if case.find("failure") is not None or case.find("error") is not None:
                module = case.get("classname", "").replace(".", "/")
                failed.append(f"{module}.py::{case.get('name')}" if module else case.get("name"))
    return TestRun(rc, seconds, ran, failed, tail)


def build(scratch: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"],
                          cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError("build failed:\n" + (proc.stdout + proc.stderr)[-4000:])
    return time.perf_counter() - start


def extension_files(scratch: Path) -> list[Path]:
    return sorted((scratch / "resnet_fast").glob("_C*.so"))


def run_mutant(m: Mutant, scratch: Path, env: dict, built: dict) -> dict:
    target = scratch / m.path
    original = target.read_text()
    target.write_text(original.replace(m.old, m.new, 1))
    build_s = None
    try:
        if m.compiled:
            build_s = build(scratch, env)
        run = run_tests(scratch, env, m.tests)
    finally:
        target.write_text(original)
        if m.compiled:  # the unmutated extension back, for the mutants that follow
            for path, data in built.items():
                path.write_bytes(data)
    # Caught: a test failed, or the mutated package broke collection (2) or pytest (3); a run
    # that timed out (-1) is reported as not caught.
    caught = bool(run.failed) or run.rc in (2, 3)
    return {"name": m.name, "file": m.path, "what": m.what, "tests": list(m.tests),
            "caught": caught, "failed_count": len(run.failed), "failed": run.failed,
            "stopped_at_maxfail": len(run.failed) >= MAXFAIL, "rc": run.rc,
            "tests_run": run.ran, "test_seconds": round(run.seconds, 1),
            "build_seconds": None if build_s is None else round(build_s, 1),
            "output_tail": None if caught else run.output_tail}


def describe_failures(result: dict) -> str:
    if not result["caught"]:
        why = f"timed out after {TEST_TIMEOUT_S} s" if result["rc"] == -1 else f"rc {result['rc']}"
        return f"NOT CAUGHT ({why}, {result['tests_run']} tests ran)"
    if not result["failed"]:
        return f"pytest rc {result['rc']} (collection or internal error)"
    count = f"{result['failed_count']}{'+' if result['stopped_at_maxfail'] else ''} failed"
    return f"{count}: " + ", ".join(result["failed"])


def print_table(results: list[dict]) -> None:
    rows = [("mutant", "file", "caught", "by (first failing tests, count)")]
    rows += [(r["name"], r["file"], "yes" if r["caught"] else "NO", describe_failures(r))
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAME", help="run this mutant only (no JSON written)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    check_patterns(MUTANTS, ROOT)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}  [{m.path}]  {m.what}\n    pytest {' '.join(m.tests)}")
        return 0
    selected = [m for m in MUTANTS if args.only in (None, m.name)]
    if not selected:
        raise SystemExit(f"no mutant named {args.only!r}; --list shows them")
    # Taken before the scratch copy exists: the commit, the command line and the load at the
    # start, like every result file.
    prov = provenance(torch.device("cpu"), warmup=None, reps=None, maxfail=MAXFAIL,
                      test_timeout_s=TEST_TIMEOUT_S)
    start = time.perf_counter()
    scratch = make_scratch(ROOT)
    try:
        env = scratch_env(scratch)
        check_imports_scratch(scratch, env)
        check_patterns(selected, scratch)
        built = {p: p.read_bytes() for p in extension_files(scratch)}
        if not built:
            raise SystemExit("mutants.py: no built extension resnet_fast/_C*.so to copy; "
                             "run `make build` first")
        print(f"scratch copy: {scratch}", flush=True)
        baseline = {}
        for selection in dict.fromkeys(m.tests for m in selected):
            run = run_tests(scratch, env, selection)
            line = f"baseline: pytest {' '.join(selection)}: rc {run.rc}, {run.ran} tests, " \
                   f"{run.seconds:.0f} s"
            print(line, flush=True)
            if run.rc != 0 or run.ran == 0:
                print(run.output_tail)
                raise SystemExit("mutants.py: the unmutated copy fails (or runs nothing) on "
                                 f"pytest {' '.join(selection)}; fix that first")
            baseline[" ".join(selection)] = {"tests_run": run.ran,
                                             "seconds": round(run.seconds, 1)}
        results = []
        for m in selected:
            result = run_mutant(m, scratch, env, built)
            results.append(result)
            build_note = (f", build {result['build_seconds']:.0f} s"
                          if result["build_seconds"] is not None else "")
            print(f"{m.name}: {'caught' if result['caught'] else 'NOT CAUGHT'} "
                  f"({result['test_seconds']:.0f} s tests{build_note})", flush=True)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)
    total = time.perf_counter() - start
    print()
    print_table(results)
    survivors = [r["name"] for r in results if not r["caught"]]
    print(f"\n{len(results) - len(survivors)}/{len(results)} caught in {total / 60:.1f} min"
          + (f"; not caught: {', '.join(survivors)}" if survivors else ""))
    if args.only is None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS, prov, {
            "total_seconds": round(total, 1), "caught": len(results) - len(survivors),
            "mutants": len(results), "baseline": baseline, "results": results})
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
