"""Measured dispatch: each fused call site runs the implementation that measured fastest there.

A call site is described by a :data:`Key` (:func:`make_key`): the op, the shape, dtype and
memory layout of each input, the device type and model name (and on the CPU the number of
threads torch uses), eval or training, and whatever else the caller names (stride, padding,
ReLU, residual, deferred input...). At that key the caller offers *candidates*: zero-argument
callables that each run one implementation on scratch copies of any state it updates (running
statistics), forward + backward in training. :meth:`Tuner.choose` returns the name of the one
to run; this module decides, times, caches, persists and explains, and never runs a candidate
for its result.

Where a choice comes from, in order:

1. the in-memory cache (keys decided or read from disk here; the oldest past MEMORY_SIZE go);
2. the JSON cache on disk (below);
3. the caller's ``static`` default, when the disk cache cannot be used (corrupt, unreadable or
   unwritable: one :class:`AutotuneCacheWarning` per :class:`Tuner`) or inside a
   ``torch.compile`` trace; a static choice is never timed and never persisted;
4. otherwise every candidate is timed, and the winner is cached and persisted.

With autotuning off (``RESNET_FAST_AUTOTUNE=0``) every choice is the static one: no cache is
read, nothing is timed or written.

Timing. Every candidate is called once untimed (a warm-up), then at least ``rounds`` rounds each
measure every candidate once, in an order shuffled afresh each round by ``random.Random(seed)``,
so that a machine whose speed drifts slows them alike. More rounds follow, up to
``max_rounds``, while the measured time of the key's candidates together is under
``budget_s`` (20 ms by default): a call site of a few hundred microseconds, where one call is
at the mercy of the noise, gets a median over many calls, one of tens of milliseconds its
minimum rounds only. A measurement is one call of the ``timer``
(``timer(fn) -> seconds per call``; the default is :func:`resnet_fast.timing.measurer`, the
method of resnet_fast's benchmarks: ``torch.utils.benchmark.Timer`` on the CPU,
``triton.testing.do_bench`` on CUDA; on the CPU with ``min_run_time=0``, the default, one call
timed by the wall clock, without the benchmark timer's untimed estimate call), with the device
synchronised before and after on CUDA. Concurrent calls for one key time it once; the others
wait for its result.

Decision rule (:func:`decide`). The medians over the rounds are compared. The ``static``
candidate is the incumbent: another candidate replaces it only if its median is below
``(1 - margin)`` times the incumbent's (faster by more than the noise margin, 3% by default);
among those the fastest wins, an exact tie going to the one offered first. A candidate that
ties with or is within the margin of the incumbent leaves the incumbent in place. A candidate
that raises (in its warm-up or a measurement) is dropped from the decision and its error
recorded; if the static candidate raises, the exception propagates: the static path is the one
that must work.

Persistence. One JSON file per device type, ``autotune-<type>.json`` in ``RESNET_FAST_CACHE_DIR``
(default ``$XDG_CACHE_HOME/resnet_fast``, else ``~/.cache/resnet_fast``). Its header records the
device's name and the torch, Triton and resnet_fast versions; a file whose header differs from
the running process is ignored and, at the next decision, rewritten. Each write re-reads the
file, merges its entries (another process may have added some) and replaces it atomically
(temporary file + ``os.replace``).

Under ``torch.compile`` the choice is read, never timed: :meth:`Tuner.choose` and
:func:`make_key` are traceable with ``fullgraph=True``, their results becoming constants of the
graph (``torch.compiler.assume_constant_result``, without guards: a graph keeps the choice it was
traced with). :func:`make_key` specialises the graph on the input shapes, since the choice
depends on them.

Explaining. :meth:`Tuner.records` gives, for every key decided (or read from disk, or given its
static default) in this process, the candidates' median times, the winner, where the choice
came from and the labels callers attached (``choose(..., label="layer1.0.conv1")``);
:func:`format_table` prints them one row per label.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import random
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Key",
    "make_key",
    "describe_key",
    "Record",
    "Tuner",
    "default_tuner",
    "decide",
    "autotune_enabled",
    "format_table",
    "AutotuneCacheWarning",
    "DEFAULT_MARGIN",
    "DEFAULT_ROUNDS",
]

#: A call site: the canonical JSON text (sorted keys, no spaces) of an object with the fields
#: ``op``, ``inputs`` (per input ``null`` or ``{"shape", "dtype", "layout"}``), ``training``,
#: ``device`` (the type), ``device_name``, ``threads`` (CPU only) and ``extra``. A plain string,
#: so it hashes, serialises and is a constant under ``torch.compile``; :func:`describe_key`
#: gives a short human form.
Key = str

#: A candidate: runs one implementation once (forward + backward in training) on scratch state.
Candidate = Callable[[], object]

DEFAULT_MARGIN = 0.03
# The first step of a model times every call site's candidates: with one warm-up call and two
# rounds of single-call measurements (3 calls a candidate) a cold ResNet step costs a few warm
# ones; more rounds buy steadier decisions. Rounds go on, up to DEFAULT_MAX_ROUNDS, while a
# key's measured time is under DEFAULT_BUDGET_S, which bounds what a small call site adds.
DEFAULT_ROUNDS = 2
DEFAULT_MAX_ROUNDS = 15
DEFAULT_BUDGET_S = 0.02
DEFAULT_MIN_RUN_TIME = 0.0  # a default-timer measurement's least run time (s): 0, one call
MEMORY_SIZE = 4096  # in-memory decisions (timed or read) and static choices, each at most
_FORMAT = 1  # of the cache file; part of its header
_ENV_ENABLE = "RESNET_FAST_AUTOTUNE"
_ENV_CACHE_DIR = "RESNET_FAST_CACHE_DIR"

SOURCE_TIMED = "timed"
SOURCE_DISK = "disk"
SOURCE_STATIC = "static"


class AutotuneCacheWarning(UserWarning):
    """The autotuning cache on disk cannot be used; misses then take their static default."""


def autotune_enabled() -> bool:
    """Whether ``RESNET_FAST_AUTOTUNE`` allows timing (unset, or anything but 0/false/off/no)."""
    return os.environ.get(_ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch before 2.3
        return torch._dynamo.is_compiling()
    return is_compiling()


# (device type, index) -> model name, computed once each.
_DEVICE_NAMES: dict[tuple[str, Optional[int]], str] = {}


def _device_name(device_type: str, index: Optional[int] = None) -> str:
    """The model name of a device: ``torch.cuda.get_device_name`` on CUDA, the CPU's model
    name otherwise (:func:`resnet_fast.timing.cpu_name`)."""
    name = _DEVICE_NAMES.get((device_type, index))
    if name is None:
        if device_type == "cuda":
            name = torch.cuda.get_device_name(index)
        else:
            from resnet_fast.timing import cpu_name

            name = cpu_name()
        _DEVICE_NAMES[(device_type, index)] = name
    return name


def _layout(t: Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def make_key(op: str, tensors: Sequence[Optional[Tensor]], training: bool, **extra) -> Key:
    """The :data:`Key` of a call of ``op`` on ``tensors`` (``None`` for an absent input), in
    training or eval, with ``extra`` (JSON values: stride, padding, relu, residual...).

    The device is that of the first tensor given. Traceable by ``torch.compile``: each
    dimension is specialised (``operator.index``), so a graph is traced per shape.
    """
    inputs = tuple(None if t is None else
                   (tuple(operator.index(d) for d in t.shape), str(t.dtype), _layout(t))
                   for t in tensors)
    device = next((t.device for t in tensors if t is not None), None)
    if device is None:
        raise ValueError(f"make_key({op!r}): no tensor among the inputs")
    return _key_text(op, inputs, bool(training), device.type, device.index,
                     tuple(sorted(extra.items())))


@torch.compiler.assume_constant_result
def _key_text(op: str, inputs: tuple, training: bool, device_type: str,
              device_index: Optional[int], extra: tuple) -> Key:
    spec = {
        "op": op,
        "inputs": [None if i is None else
                   {"shape": list(i[0]), "dtype": i[1].removeprefix("torch."), "layout": i[2]}
                   for i in inputs],
        "training": training,
        "device": device_type,
        "device_name": _device_name(device_type, device_index),
        "extra": dict(extra),
    }
    if device_type == "cpu":
        spec["threads"] = torch.get_num_threads()
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def describe_key(key: Key) -> str:
    """A key in one line: op, mode, dtype/layout of the first input, the input shapes, extras
    (e.g. ``conv_bn_relu eval float32/channels_last 8x64x56x56,64x64x3x3 stride=1 relu=True``)."""
    spec = json.loads(key)
    inputs = [i for i in spec["inputs"] if i is not None]
    parts = [spec["op"], "train" if spec["training"] else "eval"]
    if inputs:
        parts.append(f"{inputs[0]['dtype']}/{inputs[0]['layout']}")
        parts.append(",".join("x".join(map(str, i["shape"])) for i in inputs))
    parts.extend(f"{k}={v}" for k, v in spec["extra"].items())
    return " ".join(parts)


def decide(medians: Mapping[str, float], static: str, margin: float = DEFAULT_MARGIN) -> str:
    """The winner among candidates with these median times (the module's decision rule):
    ``static`` unless some candidate's median is below ``(1 - margin)`` times its median; then
    the fastest of those, the first offered on an exact tie."""
    bar = medians[static] * (1.0 - margin)
    challengers = [(t, i, name) for i, (name, t) in enumerate(medians.items())
                   if name != static and t < bar]
    return min(challengers)[2] if challengers else static


@dataclasses.dataclass
class Record:
    """One key's choice: the candidates' median times in milliseconds (empty for a static
    choice), the errors of candidates that raised, the winner, where the choice came from
    (``"timed"``, ``"disk"`` or ``"static"``) and the labels callers gave it."""

    key: Key
    static: str
    winner: str
    source: str
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """The entry the disk cache stores (all but key, source and labels)."""
        return {"static": self.static, "winner": self.winner, "times_ms": self.times_ms,
                "errors": self.errors}

    @classmethod
    def from_json(cls, key: Key, entry: dict) -> "Record":
        """The record of a disk cache entry."""
        return cls(key=key, static=entry["static"], winner=entry["winner"], source=SOURCE_DISK,
                   times_ms=dict(entry["times_ms"]), errors=dict(entry["errors"]))


class _CorruptCache(Exception):
    pass


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("winner"), str)
            and isinstance(entry.get("static"), str) and isinstance(entry.get("times_ms"), dict)
            and isinstance(entry.get("errors"), dict))


def _header(device_type: str) -> dict:
    """What a cache file must record to be used: its format, the device's name and the
    torch, Triton and resnet_fast versions of this process."""
    from resnet_fast._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"format": _FORMAT, "device": _device_name(device_type), "torch": torch.__version__,
            "triton": triton_version, "resnet_fast": __version__}


def _read_cache(path: Path, header: dict) -> dict[Key, dict]:
    """The entries of the cache file at ``path``: empty when it is missing or was written for
    another device or versions; :class:`_CorruptCache` when it cannot be read or parsed."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as exc:
        raise _CorruptCache(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("entries"), dict) \
            or not all(_valid_entry(e) for e in content["entries"].values()):
        raise _CorruptCache("not a resnet_fast autotuning cache")
    if any(content.get(k) != v for k, v in header.items()):
        return {}
    return content["entries"]


def _default_timer(device: torch.device, min_run_time: float) -> Callable[[Candidate], float]:
    if device.type != "cuda" and min_run_time <= 0:
        def one_call(fn: Candidate) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return one_call
    from resnet_fast.timing import measurer

    return lambda fn: measurer(fn, device, min_run_time)()


class Tuner:
    """Chooses, times, caches and persists the implementation each call site runs.

    ``cache_dir``: where the JSON cache lives (default ``RESNET_FAST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/resnet_fast``, else ``~/.cache/resnet_fast``, read at first use);
    ``enabled``: whether misses are timed (default: :func:`autotune_enabled`, read at every
    miss); ``timer``: ``timer(fn) -> seconds`` for one measurement (default: resnet_fast's
    benchmark method with ``min_run_time``); ``margin``, ``rounds``, ``seed``: the decision
    rule's noise margin, the least rounds of measurements and the seed of their shuffled
    orders; ``budget_s``, ``max_rounds``: more rounds run while a key's measured seconds are
    under ``budget_s``, up to ``max_rounds`` in all (``budget_s=0``: ``rounds`` exactly).
    """

    def __init__(self, cache_dir: Optional[os.PathLike] = None, *,
                 enabled: Optional[bool] = None,
                 timer: Optional[Callable[[Candidate], float]] = None,
                 margin: float = DEFAULT_MARGIN, rounds: int = DEFAULT_ROUNDS, seed: int = 0,
                 min_run_time: float = DEFAULT_MIN_RUN_TIME,
                 budget_s: float = DEFAULT_BUDGET_S, max_rounds: int = DEFAULT_MAX_ROUNDS):
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        if max_rounds < rounds:
            raise ValueError(f"max_rounds must be at least rounds ({rounds}), got {max_rounds}")
        if budget_s < 0:
            raise ValueError(f"budget_s must be at least 0, got {budget_s}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        self._enabled = enabled
        self._timer = timer
        self.margin = margin
        self.rounds = rounds
        self.max_rounds = max_rounds
        self.budget_s = budget_s
        self.seed = seed
        self.min_run_time = min_run_time
        self._lock = threading.Lock()  # guards everything below
        self._write_lock = threading.Lock()  # one writer of the cache files at a time
        self._records: dict[Key, Record] = {}  # the in-memory cache: timed or read from disk
        self._static: dict[Key, Record] = {}  # static choices, kept only to explain them
        # device type -> the entries of its cache file; None: the file is unusable
        self._disk: dict[str, Optional[dict[Key, dict]]] = {}
        self._writable: Optional[bool] = None
        self._pending: dict[Key, threading.Event] = {}  # keys being timed
        self._warned = False

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            env = os.environ.get(_ENV_CACHE_DIR)
            if env:
                self._cache_dir = Path(env)
            else:
                base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
                self._cache_dir = Path(base) / "resnet_fast"
        return self._cache_dir

    def cache_path(self, device_type: str) -> Path:
        """The cache file of ``device_type`` (``"cpu"``, ``"cuda"``)."""
        return self.cache_dir / f"autotune-{device_type}.json"

    @property
    def enabled(self) -> bool:
        return autotune_enabled() if self._enabled is None else self._enabled

    def choose(self, key: Key, candidates: Mapping[str, Candidate], static: str, *,
               label: Optional[str] = None) -> str:
        """The name of the candidate to run at ``key`` (see the module docstring for where it
        comes from); ``static`` names the caller's default, ``label`` the call site (kept for
        :meth:`records`). Candidates are timed on the current device of the key's type."""
        if static not in candidates:
            raise ValueError(f"static candidate {static!r} is not among {list(candidates)}")
        if not self.enabled:
            return self._choose_static(key, static, label)
        if _is_compiling():
            return self._choose_traced(key, tuple(candidates), static, label)
        while True:
            winner = self._lookup(key, candidates, label)
            if winner is not None:
                return winner
            device_type = json.loads(key)["device"]
            if not self._can_persist(device_type):
                return self._choose_static(key, static, label)
            with self._lock:
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    break
            event.wait()  # another thread is timing this key: then read its result
        try:
            record = self._measure(key, candidates, static, torch.device(device_type))
            record.labels = [] if label is None else [label]
            with self._lock:
                self._keep(self._records, key, record)
            self._persist(device_type, key, record)
            return record.winner
        finally:
            with self._lock:
                del self._pending[key]
            event.set()

    @torch.compiler.assume_constant_result
    def _choose_traced(self, key: Key, names: tuple[str, ...], static: str,
                       label: Optional[str]) -> str:
        """:meth:`choose` under a ``torch.compile`` trace: run by the tracer, its result a
        constant of the graph."""
        winner = self._lookup(key, names, label)
        return self._choose_static(key, static, label) if winner is None else winner

    def _lookup(self, key: Key, names, label: Optional[str]) -> Optional[str]:
        """The cached winner at ``key`` (memory, then disk) if it is among ``names``."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                entries = self._entries(json.loads(key)["device"])
                entry = None if entries is None else entries.get(key)
                if entry is not None:
                    record = self._keep(self._records, key, Record.from_json(key, entry))
            if record is None or record.winner not in names:
                return None
            if label is not None and label not in record.labels:
                record.labels.append(label)
            return record.winner

    def _choose_static(self, key: Key, static: str, label: Optional[str]) -> str:
        with self._lock:
            record = self._static.get(key) or self._keep(self._static, key, Record(
                key=key, static=static, winner=static, source=SOURCE_STATIC))
            if label is not None and label not in record.labels:
                record.labels.append(label)
        return static

    def _keep(self, table: dict[Key, Record], key: Key, record: Record) -> Record:
        """``table[key] = record`` (under the lock), the oldest entry evicted past MEMORY_SIZE."""
        if key not in table and len(table) >= MEMORY_SIZE:
            del table[next(iter(table))]
        table[key] = record
        return record

    def _entries(self, device_type: str) -> Optional[dict[Key, dict]]:
        """The disk cache's entries for ``device_type``, read once (under ``self._lock``);
        ``None`` when the file is unusable."""
        if device_type not in self._disk:
            path = self.cache_path(device_type)
            try:
                self._disk[device_type] = _read_cache(path, _header(device_type))
            except _CorruptCache as exc:
                self._disk[device_type] = None
                self._warn(f"cannot use the autotuning cache {path} ({exc}); delete it or set "
                           f"{_ENV_CACHE_DIR}")
        return self._disk[device_type]

    def _can_persist(self, device_type: str) -> bool:
        """Whether the cache file of ``device_type`` is usable and its directory writable
        (tried once, by creating and removing a file there)."""
        with self._lock:
            if self._entries(device_type) is None:
                return False
            if self._writable is None:
                try:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    fd, probe = tempfile.mkstemp(dir=self.cache_dir, prefix=".probe-")
                    os.close(fd)
                    os.remove(probe)
                    self._writable = True
                except OSError as exc:
                    self._writable = False
                    self._warn(f"cannot write the autotuning cache in {self.cache_dir} "
                               f"({type(exc).__name__}: {exc}); set {_ENV_CACHE_DIR} to a "
                               f"writable directory")
            return self._writable

    def _warn(self, message: str) -> None:
        """Issues ``message`` as an :class:`AutotuneCacheWarning`, the first time only; misses
        from disk take their static defaults from then on."""
        if not self._warned:
            self._warned = True
            warnings.warn(message + "; choices not in memory take their static defaults",
                          AutotuneCacheWarning)

    def _measure(self, key: Key, candidates: Mapping[str, Candidate], static: str,
                 device: torch.device) -> Record:
        """Times the candidates (warm-up, then shuffled rounds) and applies :func:`decide`."""
        from resnet_fast.timing import error_text, synchronize, warm_up

        timer = self._timer or _default_timer(device, self.min_run_time)
        errors: dict[str, str] = {}
        times: dict[str, list[float]] = {}

        def drop(name: str, exc: Exception) -> None:
            if name == static:
                raise exc
            errors[name] = error_text(exc)
            times.pop(name, None)

        for name, fn in candidates.items():
            try:
                warm_up(fn, 1, device)
            except Exception as exc:
                drop(name, exc)
            else:
                times[name] = []
        rng = random.Random(self.seed)
        for done in range(self.max_rounds):
            if done >= self.rounds and (
                    not times or sum(map(sum, times.values())) >= self.budget_s):
                break
            order = list(times)
            rng.shuffle(order)
            for name in order:
                try:
                    synchronize(device)
                    seconds = timer(candidates[name])
                    synchronize(device)
                except Exception as exc:
                    drop(name, exc)
                else:
                    times[name].append(seconds)
        medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        return Record(key=key, static=static, winner=decide(medians, static, self.margin),
                      source=SOURCE_TIMED, times_ms=medians, errors=errors)

    def _persist(self, device_type: str, key: Key, record: Record) -> None:
        """Adds ``record`` to the cache file: re-read, merged, replaced atomically."""
        path = self.cache_path(device_type)
        header = _header(device_type)
        with self._write_lock:
            try:
                entries = _read_cache(path, header)
            except _CorruptCache:  # it was valid when read first: replace what broke it since
                entries = {}
            entries[key] = record.to_json()
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({**header, "entries": entries}, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)
                except BaseException:
                    os.remove(tmp)
                    raise
            except OSError as exc:
                with self._lock:
                    self._writable = False
                    self._warn(f"cannot write the autotuning cache {path} "
                               f"({type(exc).__name__}: {exc})")
                return
        with self._lock:
            self._disk[device_type] = entries

    def records(self) -> list[Record]:
        """A copy of every choice made in this process: timed or read from disk, then those
        that took their static default (and were not decided since)."""
        with self._lock:
            rows = list(self._records.values())
            rows += [r for k, r in self._static.items() if k not in self._records]
            return [dataclasses.replace(r, times_ms=dict(r.times_ms), errors=dict(r.errors),
                                        labels=list(r.labels)) for r in rows]

    def clear(self) -> None:
        """Forgets the choices of this process and what was read from disk (the files stay)."""
        with self._lock:
            self._records.clear()
            self._static.clear()
            self._disk.clear()
            self._writable = None
            self._warned = False


def format_table(records: Sequence[Record]) -> str:
    """``records`` as a text table, one row per label (one unlabelled row for a record without
    labels): layer, key, each candidate's median time in ms (or its error), winner, source."""
    rows = [("layer", "key", "candidates (median ms)", "winner", "source")]
    for r in records:
        times = [f"{name} {ms:.3f}" for name, ms in r.times_ms.items()]
        times += [f"{name} failed ({error})" for name, error in r.errors.items()]
        cells = (describe_key(r.key), ", ".join(times) or "-", r.winner, r.source)
        rows += [(label, *cells) for label in (r.labels or ["-"])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]])
                     for row in rows)


# Created at import (its construction reads nothing), so that a compiled graph can reach it.
_DEFAULT_TUNER = Tuner()


def default_tuner() -> Tuner:
    """The process-wide :class:`Tuner` the fused layers share (environment read at first
    use)."""
    return _DEFAULT_TUNER
