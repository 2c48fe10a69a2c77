"""Measured dispatch (resnet_fast.autotune): keys, the decision rule, the caches on disk and in
memory, torch.compile, threads and the explain table.

Candidates here return the seconds a fake timer reports for them (one value per round, cycled)
and count their calls, so decisions are exact and no real timing runs except in one test of the
default timer. Every tuner gets its own cache directory under ``tmp_path``.
"""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch

from resnet_fast import autotune
from resnet_fast.autotune import AutotuneCacheWarning, Tuner, decide, make_key

ROUNDS = 3


class Fake:
    """Candidates that return their fake seconds per call (``times[name]``: a number or one per
    round, cycled) and count calls; ``timer`` reports what a candidate returns and counts
    measurements."""

    def __init__(self, times: dict, fail: tuple[str, ...] = (), delay_s: float = 0.0):
        self.times = {name: t if isinstance(t, (list, tuple)) else [t] for name, t in times.items()}
        self.fail = fail
        self.delay_s = delay_s
        self.calls = {name: 0 for name in times}
        self.measured = {name: 0 for name in times}
        self._lock = threading.Lock()

    def candidate(self, name: str):
        def run():
            with self._lock:
                n = self.calls[name]
                self.calls[name] += 1
            if name in self.fail:
                raise RuntimeError(f"{name} cannot run here")
            seq = self.times[name]
            return seq[max(n - 1, 0) % len(seq)]  # call 0 is the warm-up
        run.candidate_name = name
        return run

    @property
    def candidates(self) -> dict:
        return {name: self.candidate(name) for name in self.times}

    def timer(self, fn) -> float:
        with self._lock:
            self.measured[fn.candidate_name] += 1
        time.sleep(self.delay_s)
        return fn()


def _tuner(tmp_path, fake: Fake = None, **kwargs) -> Tuner:
    kwargs.setdefault("enabled", True)
    kwargs.setdefault("budget_s", 0.0)
    return Tuner(tmp_path / "cache", timer=None if fake is None else fake.timer, rounds=ROUNDS,
                 **kwargs)


def _key(op: str = "conv_bn_relu", shape=(2, 4, 5, 5), training: bool = False, **extra):
    x = torch.zeros(shape)
    w = torch.zeros(4, shape[1], 3, 3)
    return make_key(op, [x, w, None], training, stride=1, relu=True, **extra)


# --- keys -----------------------------------------------------------------------------------

def test_key_describes_the_call_site():
    x = torch.zeros(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(4, 4, 3, 3, dtype=torch.bfloat16)
    s = torch.zeros(4, 6)[:, ::2]
    key = make_key("conv_bn_relu", [x, w, None, s], True, stride=2, relu=False)
    spec = json.loads(key)
    assert spec["op"] == "conv_bn_relu" and spec["training"] is True
    assert spec["inputs"] == [
        {"shape": [2, 4, 5, 5], "dtype": "float32", "layout": "channels_last"},
        {"shape": [4, 4, 3, 3], "dtype": "bfloat16", "layout": "contiguous"},
        None,
        {"shape": [4, 3], "dtype": "float32", "layout": "strided"},
    ]
    from resnet_fast.timing import cpu_name

    assert spec["device"] == "cpu" and spec["device_name"] == cpu_name()
    # a host of the same model name with other vector instructions tunes afresh
    assert cpu_name().endswith(", " + torch.backends.cpu.get_cpu_capability())
    assert spec["threads"] == torch.get_num_threads()
    assert spec["extra"] == {"stride": 2, "relu": False}
    assert key == make_key("conv_bn_relu", [x, w, None, s], True, relu=False, stride=2)
    assert key != make_key("conv_bn_relu", [x, w, None, s], False, relu=False, stride=2)
    assert len({key, make_key("conv_bn_relu", [x, w, None, s], True, relu=False, stride=2)}) == 1
    assert autotune.describe_key(key) == \
        "conv_bn_relu train float32/channels_last 2x4x5x5,4x4x3x3,4x3 relu=False stride=2"
    with pytest.raises(ValueError, match="no tensor"):
        make_key("bn_relu", [None], False)


# --- the decision rule ----------------------------------------------------------------------

@pytest.mark.parametrize("medians, winner", [
    ({"aten": 1.0, "fused": 0.5, "triton": 0.7}, "fused"),  # the fastest beyond the margin
    ({"aten": 1.0, "fused": 0.98}, "aten"),  # within the 3% margin: the incumbent stays
    ({"aten": 1.0, "fused": 0.969}, "fused"),  # beyond it
    ({"aten": 1.0, "fused": 1.0}, "aten"),  # exact tie
    ({"fused": 0.5, "aten": 1.0, "triton": 0.5}, "fused"),  # tie among challengers: first offered
    ({"aten": 1.0, "fused": 2.0}, "aten"),
])
def test_decide(medians, winner):
    assert decide(medians, "aten") == winner


def test_decide_margin_is_a_parameter():
    assert decide({"aten": 1.0, "fused": 0.9}, "aten", margin=0.2) == "aten"
    assert decide({"aten": 1.0, "fused": 0.9}, "aten", margin=0.0) == "fused"
    assert decide({"aten": 1.0, "fused": 1.0}, "aten", margin=0.0) == "aten"


@pytest.mark.parametrize("seconds,rounds", [(1e-3, 10), (4e-3, 3), (5e-2, ROUNDS),
                                             (1e-5, 15)])
def test_rounds_follow_the_time_budget(tmp_path, seconds, rounds):
    """After its least rounds a key is measured further while its candidates' measured time is
    under the budget, up to max_rounds: a cheap call site gets a median over many calls, an
    expensive one its least rounds."""
    fake = Fake({"aten": seconds, "fused": seconds / 2})
    tuner = _tuner(tmp_path, fake, budget_s=0.015, max_rounds=15)
    assert tuner.choose(_key(), fake.candidates, "aten") == "fused"
    assert fake.measured == {"aten": rounds, "fused": rounds}


def test_fastest_wins_by_median(tmp_path):
    # "fused" has one slow round (an outlier the median ignores); "triton" is slower throughout.
    fake = Fake({"aten": 1e-3, "fused": [5e-4, 9e-3, 5e-4], "triton": 8e-4})
    tuner = _tuner(tmp_path, fake)
    key = _key()
    assert tuner.choose(key, fake.candidates, "aten") == "fused"
    assert fake.measured == {"aten": ROUNDS, "fused": ROUNDS, "triton": ROUNDS}
    assert fake.calls == {"aten": ROUNDS + 1, "fused": ROUNDS + 1, "triton": ROUNDS + 1}
    (record,) = tuner.records()
    assert record.source == "timed" and record.winner == "fused"
    assert record.times_ms == pytest.approx({"aten": 1.0, "fused": 0.5, "triton": 0.8})
    # decided once: the in-memory cache answers from then on
    assert tuner.choose(key, fake.candidates, "aten") == "fused"
    assert fake.measured["aten"] == ROUNDS


def test_within_margin_keeps_static(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 0.98e-3})
    assert _tuner(tmp_path, fake).choose(_key(), fake.candidates, "aten") == "aten"
    fake = Fake({"aten": 1e-3, "fused": 0.98e-3})
    assert _tuner(tmp_path / "b", fake, margin=0.01).choose(_key(), fake.candidates,
                                                            "aten") == "fused"


def test_raising_candidate_is_dropped(tmp_path):
    fake = Fake({"aten": 1e-3, "broken": 1e-6, "fused": 5e-4}, fail=("broken",))
    tuner = _tuner(tmp_path, fake)
    assert tuner.choose(_key(), fake.candidates, "aten") == "fused"
    (record,) = tuner.records()
    assert set(record.times_ms) == {"aten", "fused"}
    assert record.errors == {"broken": "RuntimeError: broken cannot run here"}
    assert fake.measured["broken"] == 0  # dropped at its warm-up


def test_raising_static_candidate_raises(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4}, fail=("aten",))
    tuner = _tuner(tmp_path, fake)
    with pytest.raises(RuntimeError, match="aten cannot run here"):
        tuner.choose(_key(), fake.candidates, "aten")
    assert tuner.records() == []
    with pytest.raises(ValueError, match="not among"):
        tuner.choose(_key(), fake.candidates, "cutlass")


def test_disabled_gives_static_untimed(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = Tuner(tmp_path / "cache", timer=fake.timer)
    assert tuner.choose(_key(), fake.candidates, "aten", label="layer1.0.conv1") == "aten"
    assert fake.calls == {"aten": 0, "fused": 0}
    assert [(r.source, r.winner, r.labels) for r in tuner.records()] == \
        [("static", "aten", ["layer1.0.conv1"])]
    assert not (tmp_path / "cache").exists()  # never persisted
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "1")  # read at every miss
    assert tuner.choose(_key(), fake.candidates, "aten") == "fused"


# --- torch.compile --------------------------------------------------------------------------

def _compiled_site(tuner: Tuner, fake: Fake, dynamic=None):
    """A compiled function whose branch is the tuner's choice at trace time."""
    def f(x):
        key = make_key("bn_relu", [x], False, relu=True)
        if tuner.choose(key, fake.candidates, "aten", label="layer1") == "aten":
            return x + 1
        return x - 1
    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True, backend="eager", dynamic=dynamic)


def test_compile_cold_cache_takes_static(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    assert _compiled_site(tuner, fake)(torch.zeros(3)).tolist() == [1.0] * 3
    assert fake.calls == {"aten": 0, "fused": 0}
    assert [(r.source, r.labels) for r in tuner.records()] == [("static", ["layer1"])]


def test_compile_warm_cache_takes_the_winner(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    x = torch.zeros(3)
    assert tuner.choose(make_key("bn_relu", [x], False, relu=True), fake.candidates,
                        "aten") == "fused"
    calls = dict(fake.calls)
    assert _compiled_site(tuner, fake)(x).tolist() == [-1.0] * 3
    assert fake.calls == calls  # read, not timed
    # another shape: a new trace, a miss, the static default
    assert _compiled_site(tuner, fake)(torch.zeros(4)).tolist() == [1.0] * 4


def test_compile_dynamic_shapes_are_specialised(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    x = torch.zeros(3)
    tuner.choose(make_key("bn_relu", [x], False, relu=True), fake.candidates, "aten")
    site = _compiled_site(tuner, fake, dynamic=True)
    assert site(x).tolist() == [-1.0] * 3
    assert site(torch.zeros(4)).tolist() == [1.0] * 4
    assert site(x).tolist() == [-1.0] * 3


# --- persistence ----------------------------------------------------------------------------

def test_persisted_winner_is_read_without_timing(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    assert _tuner(tmp_path, fake).choose(_key(), fake.candidates, "aten") == "fused"
    (path,) = (tmp_path / "cache").iterdir()
    assert path.name == "autotune-cpu.json"
    content = json.loads(path.read_text())
    assert content["device"] == autotune._device_name("cpu")
    assert content["torch"] == torch.__version__
    assert {"triton", "resnet_fast", "format"} <= set(content)
    assert content["entries"][_key()]["winner"] == "fused"

    again = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, again)
    assert tuner.choose(_key(), again.candidates, "aten", label="layer2") == "fused"
    assert again.calls == {"aten": 0, "fused": 0}
    (record,) = tuner.records()
    assert record.source == "disk" and record.labels == ["layer2"]
    assert record.times_ms == pytest.approx({"aten": 1.0, "fused": 0.5})


def test_writes_merge_entries_of_other_tuners(tmp_path):
    a, b = Fake({"aten": 1e-3, "fused": 5e-4}), Fake({"aten": 1e-3, "fused": 2e-3})
    ta, tb = _tuner(tmp_path, a), _tuner(tmp_path, b)
    assert ta.choose(_key(shape=(2, 4, 5, 5)), a.candidates, "aten") == "fused"
    assert tb.choose(_key(shape=(2, 4, 6, 6)), b.candidates, "aten") == "aten"
    entries = json.loads((tmp_path / "cache" / "autotune-cpu.json").read_text())["entries"]
    assert len(entries) == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("field", ["device", "torch", "triton", "resnet_fast", "format"])
def test_changed_device_or_version_invalidates(tmp_path, field):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    _tuner(tmp_path, fake).choose(_key(), fake.candidates, "aten")
    path = tmp_path / "cache" / "autotune-cpu.json"
    content = json.loads(path.read_text())
    content[field] = "something else"
    content["entries"][_key()]["winner"] = "aten"
    path.write_text(json.dumps(content))

    again = Fake({"aten": 1e-3, "fused": 5e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # invalidation is no warning
        assert _tuner(tmp_path, again).choose(_key(), again.candidates, "aten") == "fused"
    assert again.measured == {"aten": ROUNDS, "fused": ROUNDS}  # timed again
    rewritten = json.loads(path.read_text())
    assert rewritten[field] != "something else"
    assert rewritten["entries"][_key()]["winner"] == "fused"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"entries": {"k": {"winner": 3}}}'])
def test_corrupt_cache_warns_once_and_takes_static(tmp_path, text):
    path = tmp_path / "cache" / "autotune-cpu.json"
    path.parent.mkdir()
    path.write_text(text)
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    with pytest.warns(AutotuneCacheWarning, match="cannot use the autotuning cache") as caught:
        assert tuner.choose(_key(shape=(2, 4, 5, 5)), fake.candidates, "aten") == "aten"
        assert tuner.choose(_key(shape=(2, 4, 6, 6)), fake.candidates, "aten") == "aten"
    assert len(caught) == 1
    assert fake.calls == {"aten": 0, "fused": 0}
    assert path.read_text() == text  # left for the user to look at


def _warns_once_and_takes_static(tuner: Tuner, fake: Fake, match: str) -> None:
    with pytest.warns(AutotuneCacheWarning, match=match) as caught:
        assert tuner.choose(_key(shape=(2, 4, 5, 5)), fake.candidates, "aten") == "aten"
        assert tuner.choose(_key(shape=(2, 4, 6, 6)), fake.candidates, "aten") == "aten"
    assert len(caught) == 1
    assert fake.calls == {"aten": 0, "fused": 0}


def test_read_only_directory_warns_once_and_takes_static(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        try:
            (cache / "probe").write_text("")
        except OSError:
            pass
        else:
            pytest.skip("chmod does not stop this user (root) from writing")
        fake = Fake({"aten": 1e-3, "fused": 5e-4})
        _warns_once_and_takes_static(_tuner(tmp_path, fake), fake, "cannot write")
    finally:
        cache.chmod(0o700)


def test_directory_that_cannot_be_made_warns_once_and_takes_static(tmp_path):
    (tmp_path / "file").write_text("")
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    _warns_once_and_takes_static(Tuner(tmp_path / "file" / "cache", enabled=True,
                                       timer=fake.timer, rounds=ROUNDS, budget_s=0.0), fake,
                                 "cannot write")


def test_failed_write_keeps_the_winner_in_memory(tmp_path, monkeypatch):
    def no_replace(src, dst):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(autotune.os, "replace", no_replace)
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    with pytest.warns(AutotuneCacheWarning, match="read-only file system") as caught:
        assert tuner.choose(_key(), fake.candidates, "aten") == "fused"
        assert tuner.choose(_key(shape=(2, 4, 6, 6)), fake.candidates, "aten") == "aten"
    assert len(caught) == 1
    assert tuner.choose(_key(), fake.candidates, "aten") == "fused"
    assert fake.measured == {"aten": ROUNDS, "fused": ROUNDS}  # only the first key was timed
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary file is gone


def test_memory_keeps_at_most_memory_size_keys(tmp_path, monkeypatch):
    """Past MEMORY_SIZE keys the oldest decision leaves memory (it stays on disk, and is read
    back from there, untimed); static choices are bounded alike."""
    monkeypatch.setattr(autotune, "MEMORY_SIZE", 2)
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    keys = [_key(shape=(2, 4, s, s)) for s in (5, 6, 7)]
    for key in keys:
        assert tuner.choose(key, fake.candidates, "aten") == "fused"
    assert [r.key for r in tuner.records()] == keys[1:]
    assert tuner.choose(keys[0], fake.candidates, "aten") == "fused"
    assert fake.measured == {"aten": 3 * ROUNDS, "fused": 3 * ROUNDS}  # read from disk
    assert [r.key for r in tuner.records()] == [keys[2], keys[0]]
    untimed = _tuner(tmp_path / "off", enabled=False)
    for key in keys:
        untimed.choose(key, fake.candidates, "aten")
    assert len(untimed.records()) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "env"))
    assert Tuner().cache_path("cuda") == tmp_path / "env" / "autotune-cuda.json"
    monkeypatch.delenv("RESNET_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Tuner().cache_dir == tmp_path / "xdg" / "resnet_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Tuner().cache_dir == tmp_path / "home" / ".cache" / "resnet_fast"


# --- threads, the default timer, explaining -------------------------------------------------

def test_threads_time_a_key_once(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4, "triton": 7e-4}, delay_s=0.005)
    tuner = _tuner(tmp_path, fake)
    key = _key()
    start = threading.Barrier(8)
    results = []

    def worker():
        start.wait()
        results.append(tuner.choose(key, fake.candidates, "aten"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == ["fused"] * 8
    assert fake.measured == {"aten": ROUNDS, "fused": ROUNDS, "triton": ROUNDS}
    assert fake.calls == {name: ROUNDS + 1 for name in fake.calls}


def test_default_timer_measures(tmp_path):
    x = torch.randn(64, 64)
    tuner = Tuner(tmp_path / "cache", enabled=True, rounds=2, min_run_time=1e-4)
    winner = tuner.choose(make_key("matmul", [x], False), {
        "one": lambda: x @ x,
        "twenty": lambda: [x @ x for _ in range(20)],
    }, "twenty")
    assert winner == "one"
    (record,) = tuner.records()
    assert 0 < record.times_ms["one"] < record.times_ms["twenty"]


def test_default_timer_one_call_per_measurement(tmp_path):
    """On the CPU with min_run_time 0 a measurement is one call: a candidate runs its warm-up
    and one call per round, 3 calls with the default 2 rounds (and no time budget)."""
    x = torch.randn(64, 64)
    calls = {"one": 0, "twenty": 0}

    def counted(name, n):
        def run():
            calls[name] += 1
            return [x @ x for _ in range(n)]
        return run

    tuner = Tuner(tmp_path / "cache", enabled=True, budget_s=0.0)
    assert tuner.min_run_time == 0 and tuner.rounds == autotune.DEFAULT_ROUNDS == 2
    winner = tuner.choose(make_key("matmul", [x], False),
                          {"one": counted("one", 1), "twenty": counted("twenty", 20)}, "twenty")
    assert winner == "one"
    assert calls == {"one": 3, "twenty": 3}


def test_format_table(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4, "broken": 1e-6}, fail=("broken",))
    tuner = _tuner(tmp_path, fake)
    tuner.choose(_key(), fake.candidates, "aten", label="layer1.0.conv1")
    tuner.choose(_key(), fake.candidates, "aten", label="layer1.1.conv1")
    tuner.choose(_key(shape=(2, 4, 6, 6)), fake.candidates, "aten")
    autotune_off = Tuner(tmp_path / "off", enabled=False)
    autotune_off.choose(_key(), fake.candidates, "aten", label="stem")
    table = autotune.format_table(tuner.records() + autotune_off.records())
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "key", "candidates", "(median", "ms)", "winner", "source"]
    assert len(lines) == 5
    assert "layer1.0.conv1" in lines[1] and "layer1.1.conv1" in lines[2]
    assert "aten 1.000, fused 0.500, broken failed (RuntimeError" in lines[1]
    assert lines[1].split()[-2:] == ["fused", "timed"]
    assert "2x4x6x6" in lines[3] and lines[3].startswith("-")
    assert lines[4].startswith("stem") and lines[4].split()[-2:] == ["aten", "static"]


def test_clear_and_default_tuner(tmp_path):
    fake = Fake({"aten": 1e-3, "fused": 5e-4})
    tuner = _tuner(tmp_path, fake)
    tuner.choose(_key(), fake.candidates, "aten")
    tuner.clear()
    assert tuner.records() == []
    assert tuner.choose(_key(), fake.candidates, "aten") == "fused"
    assert tuner.records()[0].source == "disk"  # clear() keeps the files
    assert autotune.default_tuner() is autotune.default_tuner()
    assert isinstance(autotune.default_tuner(), Tuner)
