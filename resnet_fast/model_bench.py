"""Benchmark of whole ResNets: a training step and eval, fused vs eager vs torch.compile, the
measuring core of ``python -m resnet_fast bench`` and ``benchmarks/bench_model.py``.

Providers, all measured in the same run on the same inputs from the same weights: ``eager``
(the eager model of :mod:`resnet_fast.reference`, torchvision's structure and forward),
``compile`` (``torch.compile`` of that eager model, default mode, after
``torch._dynamo.reset()``; ``recompiles`` counts its compilations after the first call) and ``fused`` (the model of
:mod:`resnet_fast.models` with the backend picked for the device; ``fused:NAME`` for backend
NAME); when asked for, ``fused_memory_efficient`` (the same with ``memory_efficient=True``).
Each provider has its own copy of the model, loaded from one state_dict.

Modes: ``train``, one SGD step (forward, cross-entropy loss, backward, ``optimizer.step()``;
momentum 0.9, gradients set to None each step); ``eval``, a forward in eval mode under
``torch.no_grad()``. Layouts: ``channels_last`` (model and input) and ``contiguous`` (NCHW).
``--dtype bfloat16`` / ``float16`` run under ``torch.autocast`` with float32 parameters.

A fused model with the default backend is dispatched by measurement (:mod:`resnet_fast.dispatch`;
``RESNET_FAST_AUTOTUNE=0`` turns it off): it is tuned on the benchmark's batch before anything is
timed, so its rows are those of a warm cache; ``--explain`` prints each layer's decision.

Timing (:mod:`resnet_fast.timing`): after ``--warmup`` calls per provider (torch.compile
compiles in the first), ``--reps`` rounds, each timing one call of every provider in a freshly
shuffled order, so that a machine whose speed drifts slows them alike (on the CPU each timed
call follows one untimed call, torch's Timer estimating its block size). Each row gives the
median time per call, its spread (min, max, and (max - min) / median), images/s from the
median, and the speed-up over eager. Memory, per provider: on CUDA ``cuda_step_peak_mb``, the most memory allocated during
one step beyond what was allocated when it began (``torch.cuda.max_memory_allocated``); on every
device, for one training step, the bytes of the tensors saved for backward (caught with
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once: ``saved_mb``) and of
those that are not parameters or buffers (``saved_activation_mb``).

    python benchmarks/bench_model.py                    # CPU: ResNet-18 and -50, batch 32, 64x64
    python benchmarks/bench_model.py --device cuda      # bf16, batch 256, 224x224
    python benchmarks/bench_model.py --quick            # about a minute on 2 CPU cores

``--quick``: ResNet-18, training step, channels_last, batch 8 at 64x64 on the CPU (64 at
128x128 on CUDA), 1 warm-up and 5 (CUDA: 10) timed calls per provider; most of its minute on
the CPU is torch.compile compiling (``--compare eager,fused`` skips it).

``python -m resnet_fast bench`` and ``benchmarks/bench_model.py`` run this module with the same
options. Results: a printed table, and CSV + JSON (+ a PNG bar chart when matplotlib is
installed) under ``benchmarks/results/`` of the checkout (``--out``) named ``model_<device>``
(``_quick`` with ``--quick``); the JSON's ``provenance`` records the device, versions, commit,
command line and settings, and every CSV row the device, torch version and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import dispatch, models, reference
from resnet_fast.cli import MODELS, UsageError, parse_size
from resnet_fast.timing import (compiled, error_text, fmt_cell, interleave, provenance, pyplot,
                                recompiles_of, row_provenance, save_figure, time_stats,
                                write_result_files)

# The checkout's benchmarks/results, where the committed results live.
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

PROVIDERS = ("eager", "compile", "fused")
# Measured only when asked for (--compare): the fused model with memory_efficient=True.
FUSED_KINDS = ("fused", "fused_memory_efficient")
MODES = ("train", "eval")
LAYOUTS = ("channels_last", "contiguous")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Settings:
    device: str = "cpu"
    models: list = dataclasses.field(default_factory=lambda: ["resnet18", "resnet50"])
    modes: list = dataclasses.field(default_factory=lambda: list(MODES))
    layouts: list = dataclasses.field(default_factory=lambda: list(LAYOUTS))
    providers: list = dataclasses.field(default_factory=lambda: list(PROVIDERS))
    dtype: str = "float32"
    batch: int = 32
    size: tuple = (64, 64)
    small_input: bool = False
    num_classes: int = 1000
    warmup: int = 2
    reps: int = 7
    out: Path = RESULTS
    tag: str = "cpu"
    explain: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of this benchmark (shared by ``python -m resnet_fast bench``)."""
    p.add_argument("--model", default=None,
                   help="comma-separated model names (default: resnet18,resnet50; --quick: "
                        f"resnet18); valid: {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default: 32 on the CPU, 256 on CUDA; --quick: 8, 64)")
    p.add_argument("--size", default=None,
                   help="input HxW (default: 64x64 on the CPU, 224x224 on CUDA; --quick: 64x64,"
                        " 128x128)")
    p.add_argument("--dtype", default=None,
                   help=f"one of {', '.join(DTYPES)} (default: float32 on the CPU, bfloat16 on "
                        "CUDA); half types run under torch.autocast")
    p.add_argument("--mode", default=None,
                   help="train, eval or train,eval (default: both; --quick: train)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when torch sees a GPU)")
    p.add_argument("--compare", default=None,
                   help="comma-separated providers: eager, compile, fused, "
                        "fused_memory_efficient (memory_efficient=True), fused:BACKEND, "
                        "fused_memory_efficient:BACKEND (default: eager,compile,fused)")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="only channels_last (--channels-last) or only NCHW "
                        "(--no-channels-last) (default: both; --quick: channels_last)")
    p.add_argument("--small-input", action="store_true",
                   help="the small-input stem (3x3 stride-1 conv1, no max-pool)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per provider")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--tag", default=None,
                   help="file name suffix (default: device kind, + _quick with --quick)")
    p.add_argument("--explain", action="store_true",
                   help="print each fused layer's candidates, their times and the winner "
                        "(measured dispatch; see resnet_fast.dispatch)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: about a minute on 2 CPU cores")


def _split(text: Optional[str]) -> Optional[list]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _check(what: str, values: list, valid) -> list:
    for v in values:
        if v not in valid:
            raise UsageError(f"unknown {what} {v!r}; valid: {', '.join(valid)}")
    if not values:
        raise UsageError(f"no {what} given; valid: {', '.join(valid)}")
    return values


def _check_provider(name: str, device: str) -> str:
    kind, _, backend = name.partition(":")
    if kind not in PROVIDERS + FUSED_KINDS or (backend and kind not in FUSED_KINDS):
        raise UsageError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}, "
                         f"fused_memory_efficient, fused:BACKEND, "
                         f"fused_memory_efficient:BACKEND (BACKEND one of "
                         f"{', '.join(resnet_fast.BACKENDS)})")
    if backend:
        if backend not in resnet_fast.BACKENDS:
            raise UsageError(f"unknown backend {backend!r} in {name!r}; valid: "
                             f"{', '.join(resnet_fast.BACKENDS)}")
        reason = resnet_fast.unavailable_reason(backend, device)
        if reason is not None:
            raise UsageError(f"backend {backend!r} is not available on {device}: {reason}; "
                             f"available: {', '.join(resnet_fast.available_backends(device))}")
    return name


def settings_from_args(args) -> Settings:
    """Validated settings; a bad option raises :class:`UsageError`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; valid here: cpu")
    gpu = device == "cuda"
    quick = args.quick
    s = Settings(device=device)
    s.models = _check("model", _split(args.model) or (["resnet18"] if quick else s.models),
                      MODELS)
    s.modes = _check("mode", _split(args.mode) or (["train"] if quick else s.modes), MODES)
    if args.channels_last is None:
        s.layouts = ["channels_last"] if quick else list(LAYOUTS)
    else:
        s.layouts = ["channels_last" if args.channels_last else "contiguous"]
    s.providers = _split(args.compare) or list(PROVIDERS)
    if not s.providers:
        raise UsageError(f"no provider given; valid: {', '.join(PROVIDERS)}")
    s.providers = [_check_provider(p, device) for p in dict.fromkeys(s.providers)]
    s.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    _check("dtype", [s.dtype], DTYPES)
    s.batch = args.batch or ((64 if gpu else 8) if quick else (256 if gpu else 32))
    if s.batch < 1:
        raise UsageError(f"--batch {s.batch} must be at least 1")
    s.size = parse_size(args.size or (("128" if gpu else "64") if quick else
                                      ("224" if gpu else "64")))
    s.small_input = bool(args.small_input)
    least = 8 if s.small_input else 32
    if min(s.size) < least:
        stem = "small-input stem" if s.small_input else "ImageNet stem (--small-input: 8)"
        raise UsageError(f"--size {s.size[0]}x{s.size[1]} is too small for the {stem}: the "
                         f"model downsamples by {least}, so each side must be at least {least}")
    if "train" in s.modes and s.batch * _final_numel(s.size, s.small_input) < 2:
        raise UsageError(f"--batch 1 at --size {s.size[0]}x{s.size[1]} leaves one value per "
                         "channel in the last BatchNorm, which cannot train; use --batch 2 or "
                         "a larger size")
    s.warmup = args.warmup if args.warmup is not None else (1 if quick else (5 if gpu else 2))
    s.reps = args.reps if args.reps is not None else (
        (10 if gpu else 5) if quick else (20 if gpu else 7))
    if s.warmup < 0 or s.reps < 1:
        raise UsageError("--warmup must be >= 0 and --reps >= 1")
    if "compile" in s.providers and s.warmup < 1:
        s.warmup = 1  # the first call compiles: never timed
    s.explain = bool(args.explain)
    s.out = Path(args.out)
    s.tag = args.tag or (device + ("_quick" if quick else ""))
    return s


def _final_numel(size, small_input: bool) -> int:
    """Spatial elements per channel at the last stage's output."""
    def side(n):
        for _ in range(3 if small_input else 5):
            n = (n - 1) // 2 + 1
        return n
    return side(size[0]) * side(size[1])


def _build(provider: str, name: str, s: Settings, state: dict) -> tuple[torch.nn.Module,
                                                                        Callable]:
    """(module, callable) of one provider, loaded from ``state``."""
    kwargs = dict(num_classes=s.num_classes, small_input=s.small_input)
    kind, _, backend = provider.partition(":")
    if kind in FUSED_KINDS:
        model = getattr(models, name)(backend=backend or None,
                                      memory_efficient=kind == "fused_memory_efficient",
                                      **kwargs)
    else:
        model = getattr(reference, name)(**kwargs)
    model.load_state_dict(state)
    return model, (compiled(model) if provider == "compile" else model)


def _autocast(s: Settings):
    if s.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(s.device, dtype=getattr(torch, s.dtype))


def step_fn(fn: Callable, module: torch.nn.Module, mode: str, x, y, s: Settings):
    """One call of the measured work: a training step or an eval forward."""
    if mode == "eval":
        module.eval()

        def step():
            with torch.no_grad(), _autocast(s):
                return fn(x)
        return step
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(s):
            loss = F.cross_entropy(fn(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def saved_for_backward(fn: Callable, module: torch.nn.Module, x, y, s: Settings) -> tuple[int,
                                                                                         int]:
    """(bytes of all tensors saved for backward in one training forward, bytes of those that
    are not the module's parameters or buffers); each storage counted once."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    storages: dict[tuple, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            storages[(t.device, st.data_ptr())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage: not counted
            pass
        return t

    module.train()
    module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(s):
        loss = F.cross_entropy(fn(x), y)
    loss.backward()
    module.zero_grad(set_to_none=True)
    total = sum(storages.values())
    activations = sum(n for (_, ptr), n in storages.items() if ptr not in own)
    return total, activations


def _cuda_step_peak(step: Callable) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(name: str, mode: str, layout: str, s: Settings, prov: dict,
            log: Callable = print) -> list[dict]:
    """Rows for one (model, mode, layout), the providers of ``s`` interleaved."""
    device = torch.device(s.device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    state = getattr(reference, name)(num_classes=s.num_classes,
                                     small_input=s.small_input).state_dict()
    x = torch.randn(s.batch, 3, *s.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, s.num_classes, (s.batch,), device=device)
    base = dict(row_provenance(prov), device_kind=s.device, model=name, mode=mode,
                layout=layout, dtype=s.dtype, batch=s.batch, size=f"{s.size[0]}x{s.size[1]}",
                small_input=s.small_input, warmup=s.warmup, reps=s.reps)
    live, errors = {}, {}
    for provider in s.providers:
        try:
            module, fn = _build(provider, name, s, state)
            module.to(device=device, memory_format=fmt)
            backend = None
            if provider.startswith("fused"):
                backend = resnet_fast.backends.resolve_backend(module.backend, device)
            live[provider] = (module, fn, step_fn(fn, module, mode, x, y, s), backend)
        except Exception as exc:  # one provider failing (e.g. no compiler) spoils no other
            errors[provider] = exc
    errors = {p: error_text(e) for p, e in errors.items()}
    for provider, (module, _, _, _) in live.items():
        # measured dispatch decides before anything is timed (a warm cache)
        if provider in FUSED_KINDS and module.backend is None and dispatch.measured(None):
            with _autocast(s):
                table = dispatch.explain(module, x, mode)
            if s.explain:
                log(f"  {provider} {name} {mode} {layout}, measured dispatch:\n{table}")
    times = interleave({p: step for p, (_, _, step, _) in live.items()}, s.reps,
                       device=device, warmup=s.warmup, errors=errors)
    for provider, text in errors.items():
        log(f"  {provider}: failed: {text}")
    rows = []
    eager = statistics.median(times["eager"]) if "eager" in times else None
    for provider in s.providers:
        row = dict(base, provider=provider, backend=None, median_ms=None, min_ms=None,
                   max_ms=None, spread_pct=None, images_per_s=None, vs_eager=None,
                   recompiles=None, cuda_step_peak_mb=None, saved_mb=None,
                   saved_activation_mb=None, error=errors.get(provider))
        if provider in times:
            module, fn, step, backend = live[provider]
            ts = times[provider]
            med = statistics.median(ts)
            stats = time_stats(ts)
            row.update(backend=backend, median_ms=stats["median_ms"], min_ms=stats["min_ms"],
                       max_ms=stats["max_ms"], spread_pct=(max(ts) - min(ts)) / med * 100,
                       images_per_s=s.batch / med, vs_eager=(eager / med) if eager else None,
                       recompiles=recompiles_of(fn))
            try:
                if s.device == "cuda":
                    row["cuda_step_peak_mb"] = _cuda_step_peak(step)
                if mode == "train":
                    total, act = saved_for_backward(fn, module, x, y, s)
                    row.update(saved_mb=total / 2**20, saved_activation_mb=act / 2**20)
            except Exception as exc:
                row["error"] = "memory: " + error_text(exc)
        rows.append(row)
    live.clear()
    if s.device == "cuda":
        torch.cuda.empty_cache()
    return rows


COLUMNS = ("model", "mode", "layout", "provider", "median_ms", "spread_pct", "images_per_s",
           "vs_eager", "recompiles", "cuda_step_peak_mb", "saved_mb", "saved_activation_mb")
_HEADS = ("model", "mode", "layout", "provider", "median ms", "spread %", "images/s",
          "vs eager", "recompiles", "cuda peak MiB", "saved MiB", "saved act MiB")
_WIDTHS = (9, 5, 13, 27, 10, 9, 9, 9, 10, 13, 9, 13)


def _cell(row: dict, column: str) -> str:
    v = row.get(column)
    if column == "provider" and row.get("backend") and ":" not in row["provider"]:
        return f"{row['provider']}:{row['backend']}"
    if isinstance(v, float):
        return f"{v:.1f}" if column in ("spread_pct", "images_per_s") else (
            f"{v:.2f}" if column == "vs_eager" else fmt_cell(v))
    return fmt_cell(v)


def print_rows(rows: list[dict], header: bool = False) -> None:
    if header:
        line = " ".join(h.ljust(w) for h, w in zip(_HEADS, _WIDTHS))
        print(line)
        print("-" * len(line))
    for row in rows:
        print(" ".join(_cell(row, c).ljust(w) for c, w in zip(COLUMNS, _WIDTHS)), flush=True)
        if row.get("error"):
            print(f"    {row['provider']}: {row['error']}", flush=True)


def run(s: Settings, log: Callable = print) -> tuple[list[dict], dict[str, Path]]:
    """Measures every (model, mode, layout) of ``s``; prints the table, writes CSV, JSON and
    PNG; returns the rows and the paths written."""
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    prov = provenance(device, s.warmup, s.reps)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{prov['device']}: torch {prov['torch']}, {s.dtype}, batch {s.batch} at "
        f"{s.size[0]}x{s.size[1]}, {s.warmup} warm-up calls per provider, then {s.reps} rounds "
        "each timing one call of every provider in shuffled order")
    rows: list[dict] = []
    for name in s.models:
        for mode in s.modes:
            for layout in s.layouts:
                new = measure(name, mode, layout, s, prov, log)
                print_rows(new, header=not rows)
                rows += new
    paths = write_results(rows, out, s.tag, prov, s)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows, paths


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, mode, layout): each provider's speed-up over eager and saved bytes."""
    out = []
    for r in rows:
        if r["provider"] == "eager" or r["images_per_s"] is None:
            continue
        out.append({k: r[k] for k in ("model", "mode", "layout", "provider", "backend",
                                      "images_per_s", "vs_eager", "saved_activation_mb")})
    return out


def write_results(rows: list[dict], out: Path, tag: str, prov: dict, s: Settings) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(s).items()}
    return write_result_files(out / f"model_{tag}", rows, prov,
                              {"settings": settings, "summary": summarize(rows), "rows": rows},
                              plot)


def plot(rows: list[dict], path: Path, prov: dict) -> bool:
    """Grouped bars: images/s per (model, mode, layout) and provider; saved-for-backward MiB of
    the training steps in a second panel. Returns whether the PNG was written."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["images_per_s"] is not None]
    if not ok:
        return False
    configs = list(dict.fromkeys((r["model"], r["mode"], r["layout"]) for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    train = [c for c in configs if c[1] == "train"]
    panels = [("images_per_s", "images/s", configs)]
    if any(r["saved_activation_mb"] for r in ok):
        panels.append(("saved_activation_mb", "saved for backward, MiB\n(activations)", train))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.6 * len(configs) + 2),
                                                      3.4 * len(panels)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, (key, label, cfgs) in zip(axes[:, 0], panels):
        for i, provider in enumerate(providers):
            ys = [next((r[key] or 0 for r in ok if (r["model"], r["mode"], r["layout"]) == c
                        and r["provider"] == provider), 0) for c in cfgs]
            err = None
            if key == "images_per_s":  # the spread: images/s at the slowest and fastest call
                sel = [next((r for r in ok if (r["model"], r["mode"], r["layout"]) == c
                             and r["provider"] == provider), None) for c in cfgs]
                err = [[max(0.0, y - r["batch"] / r["max_ms"] * 1e3) if r else 0 for y, r in
                         zip(ys, sel)],
                       [max(0.0, r["batch"] / r["min_ms"] * 1e3 - y) if r else 0 for y, r in
                         zip(ys, sel)]]
            bars = ax.bar([j + (i - (len(providers) - 1) / 2) * width for j in range(len(cfgs))],
                          ys, width, label=provider, yerr=err, capsize=3,
                          error_kw={"elinewidth": 0.8})
            ax.bar_label(bars, fmt="%.0f" if key == "images_per_s" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(cfgs)))
        ax.set_xticklabels(["\n".join(c) for c in cfgs], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    r0 = ok[0]
    axes[0, 0].set_title(f"{prov['device']}, {r0['dtype']}, batch {r0['batch']} at "
                         f"{r0['size']} (torch {prov['torch']})", fontsize=9)
    save_figure(fig, path)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        s = settings_from_args(args)
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write to output directory {args.out!r}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    run(s)
    return 0
