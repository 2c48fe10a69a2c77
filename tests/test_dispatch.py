"""Measured dispatch (resnet_fast.dispatch): each fused call site runs the implementation its
tuner measured fastest, every candidate meets the tolerance policy, timing never touches the
caller's state, torch.compile reads the choice, and explain names each layer's decision.

The tuner's timer is injected: it runs the candidate (so timing's side effects happen as they
would) and returns the time the test assigns to that candidate's name."""

from __future__ import annotations

import threading

import pytest
import torch

import resnet_fast
from resnet_fast import autotune, dispatch, functional, reference
from test_model_memory import saved_activation_bytes
from test_models import check_policy, make_input, randomize_batch_norms, run_step, small_resnet


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Measured dispatch on, with a fresh tuner (cache under ``tmp_path``) whose timer returns
    ``tuner.times[candidate name]`` (default 1 s) after running the candidate."""
    times: dict[str, float] = {}

    def timer(fn):
        fn()
        return times.get(fn.__name__, 1.0)

    t = autotune.Tuner(tmp_path, enabled=True, timer=timer, rounds=1)
    t.times = times
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "1")
    monkeypatch.delenv("RESNET_FAST_BACKEND", raising=False)
    monkeypatch.setattr(autotune, "_DEFAULT_TUNER", t)
    monkeypatch.setattr(dispatch, "_DECIDED", {})
    return t


def test_off_in_the_test_suite_and_by_explicit_backend(monkeypatch):
    assert not dispatch.measured(None)  # RESNET_FAST_AUTOTUNE=0 (conftest)
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "1")
    assert dispatch.measured(None)
    assert not dispatch.measured("cpu")
    monkeypatch.setenv("RESNET_FAST_BACKEND", "cpu")
    assert not dispatch.measured(None)


def test_candidates():
    assert dispatch.candidates_for(torch.device("cpu")) == ("cpu", "aten")


@pytest.mark.parametrize("winner", ["cpu", "aten"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("train", [True, False])
def test_every_candidate_meets_the_policy(tuner, winner, block, train):
    """A model whose every tuned layer runs ``winner`` (the fastest by the timer), training step
    or eval, against the float64 eager model: logits, loss, every gradient and running
    statistic, num_batches_tracked equal. Timing ran each candidate during the step on scratch
    copies: a user's state updated by a timed candidate would break the buffers' check.

    A quantity that fails is compared again over other draws of the input: at batch 2 a ReLU
    whose pre-activation lies within float32 rounding of 0 may switch either way (the bottleneck
    with ``cpu`` on an AVX2 CPU with two threads: one element of layer3.0's block end at 2.6e-6
    in float64, whose gradient, 5.0e-4, then goes missing from bn3.bias's), which is no error of
    the op."""
    tuner.times.update({winner: 0.5})
    torch.manual_seed(0)
    fused, ref = small_resnet(block, num_classes=5, small_input=True)
    randomize_batch_norms(fused)
    ref.load_state_dict(fused.state_dict())
    x, target = make_input(size=16)
    check_policy(fused, ref, x, target, torch.float32, train=train, backward=train, redraws=3)
    records = tuner.records()
    assert records and {r.winner for r in records} == {winner}
    assert {r.source for r in records} == {"timed"}
    ops = {autotune.describe_key(r.key).split()[0] for r in records}
    assert "conv_bn_relu" in ops
    if train:
        assert ops & {"batch_norm_add_relu", "dual_batch_norm_add_relu"} or block == "bottleneck"


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_memory_efficient_keeps_its_saving_when_aten_is_fastest(tuner, monkeypatch, block):
    """A recomputing call site is not measured: with ATen's sequence the fastest everywhere, a
    memory_efficient model still saves for backward what it saves with dispatch off, and less
    than the default model, whose sites the tuner gives to ATen."""
    tuner.times.update({"aten": 0.1})
    torch.manual_seed(0)
    x, target = make_input(size=16)

    def saved(memory_efficient):
        torch.manual_seed(0)
        model, _ = small_resnet(block, num_classes=5, small_input=True)
        model.set_memory_efficient(memory_efficient)
        return saved_activation_bytes(model.train(), x, target)

    tuned_default, tuned = saved(False), saved(True)
    assert {r.winner for r in tuner.records()} == {"aten"}
    monkeypatch.setenv("RESNET_FAST_AUTOTUNE", "0")
    assert tuned == saved(True) < tuned_default


def test_the_fastest_wins_and_the_static_choice_holds_within_the_margin(tuner):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 4, 3, 3)

    def call():
        return functional.conv_bn_relu(x, w, None, None, padding=1)

    tuner.times.update({"cpu": 1.0, "aten": 0.98})  # 2% faster: within the 3% margin
    call()
    assert [r.winner for r in tuner.records()] == ["cpu"]
    dispatch.clear()
    tuner.cache_path("cpu").unlink()
    tuner.times.update({"aten": 0.9})
    call()
    assert [r.winner for r in tuner.records()] == ["aten"]


def test_tuned_step_updates_the_state_once(tuner):
    """One tuned training step (cold cache) leaves the running statistics and counters of one
    eager step, and the next (warm) step times nothing."""
    torch.manual_seed(0)
    fused, ref = small_resnet("basic", num_classes=5, small_input=True)
    ref.load_state_dict(fused.state_dict())
    x, target = make_input(size=16)
    f = run_step(fused, x, target, train=True, backward=True)
    e = run_step(ref, x, target, train=True, backward=True)
    for name in f:
        if name.startswith("buffer:"):
            torch.testing.assert_close(f[name], e[name], rtol=1e-5, atol=1e-6, msg=name)
    calls = []
    tuner._timer = lambda fn: calls.append(fn) or 1.0
    run_step(fused, x, target, train=True, backward=True)
    assert not calls


def test_tune_and_explain(tuner):
    """tune decides every layer and leaves the model's state and gradients as they were;
    explain names each layer with its candidates' times, winner and source."""
    torch.manual_seed(0)
    model = resnet_fast.resnet18(num_classes=5, small_input=True)
    x, _ = make_input(size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner.times.update({"aten": 0.5})
    table = dispatch.explain(model, x, "train")
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in model.parameters())
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["layer", "key"]
    for layer in ("conv1", "layer1.0.conv2", "layer4.1.conv2", "layer2.0.bn2"):
        row = next(line for line in lines if line.split()[0] == layer)
        assert "cpu 1000.000" in row and "aten 500.000" in row and row.split()[-2:] == [
            "aten", "timed"], row
    tuner._timer = lambda fn: pytest.fail("a tuned model is not timed again")
    dispatch.tune(model, x, "train")
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval'"):
        dispatch.tune(model, x, "training")


@pytest.mark.parametrize("warm", [False, True])
def test_compile_reads_the_choice(tuner, warm):
    """Under torch.compile(fullgraph=True) nothing is timed: a cold cache gives the static
    choice (the fused op in the graph), a warm one the cached winner (ATen's conv instead)."""
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)

    def layer(x):
        return functional.conv_bn_relu(x, w, rm, rv, padding=1)

    tuner.times.update({"aten": 0.5})
    if warm:
        layer(x)
        assert [r.winner for r in tuner.records()] == ["aten"]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    out = torch.compile(layer, backend=capture, fullgraph=True)(x)
    assert [r.source for r in tuner.records()] == ["timed" if warm else "static"]
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    fused = any("resnet_fast.conv_bn_act" in t for t in targets)
    assert fused != warm, targets
    torch.testing.assert_close(out, layer(x))


def test_threads_share_one_decision(tuner):
    """Several threads running a model at once: the same outputs as one thread alone."""
    torch.manual_seed(0)
    model = resnet_fast.resnet18(num_classes=5, small_input=True).eval()
    x, _ = make_input(size=16)
    tuner.times.update({"aten": 0.5})
    results = [None] * 4

    def worker(i):
        with torch.no_grad():
            results[i] = model(x)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        expected = model(x)
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=0)
    assert {r.winner for r in tuner.records()} == {"aten"}


def test_static_table(monkeypatch):
    """Nothing measured: the asked-for backend, else $RESNET_FAST_BACKEND, else the device's
    default, but the cuda BatchNorm kernels before the Triton ones on a GPU."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    assert dispatch.static_choice("batch_norm_relu", None, cpu) == "cpu"
    assert dispatch.static_choice("conv_bn_relu", "reference", cpu) == "reference"
    monkeypatch.setattr(dispatch, "available_backends", lambda d: ["triton", "cuda", "reference"])
    monkeypatch.setattr(dispatch, "resolve_backend", lambda b, d: b or "triton")
    assert dispatch.static_choice("batch_norm_relu", None, cuda) == "cuda"
    assert dispatch.static_choice("dual_batch_norm_add_relu", None, cuda) == "cuda"
    assert dispatch.static_choice("conv_bn_relu", None, cuda) == "triton"
    assert dispatch.static_choice("batch_norm_relu", "triton", cuda) == "triton"
    monkeypatch.setenv("RESNET_FAST_BACKEND", "triton")
    assert dispatch.static_choice("batch_norm_relu", None, cuda) == "triton"


def test_call_signature(monkeypatch):
    """The signature of a decided call site tells apart everything a call's checks and its choice
    depend on, and nothing else: a clone with the same metadata has the same one."""
    signature = dispatch._C.call_signature
    x = torch.randn(2, 3, 4, 4)
    base = signature(x, None)
    assert signature(x.clone(), None) == base
    assert signature(x, 3) is None  # not a tensor: checked in full
    variants = [
        signature(x.double(), None),
        signature(x.contiguous(memory_format=torch.channels_last), None),
        signature(x[:1], None),
        signature(x.transpose(2, 3), None),
        signature(x.clone().requires_grad_(), None),
        signature(torch.nn.Parameter(x), None),
        signature(None, x),
        signature(x, None, None),
    ]
    with torch.no_grad():
        variants.append(signature(x, None))
    with torch.autocast("cpu", torch.bfloat16):
        variants.append(signature(x, None))
    with torch.autocast("cpu", torch.float16):
        variants.append(signature(x, None))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        variants.append(signature(x, None))
    finally:
        torch.set_num_threads(threads)
    for name, value in (("RESNET_FAST_BACKEND", "cpu"), ("RESNET_FAST_AUTOTUNE", "1"),
                        ("TRITON_INTERPRET", "0")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            variants.append(signature(x, None))
    assert len({base, *variants}) == len(variants) + 1


def test_a_decided_call_site_skips_only_what_it_has_checked(tuner, monkeypatch):
    """A call with a decided site's signature runs its winner without argument checks or the
    tuner, and gives the same result; a change in any tensor's metadata, a flag, grad mode or
    the backend variable makes a new site, checked in full (bad input still gets its error)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 4, 3, 3)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    checked = []
    check = functional._check_conv_bn_relu_call
    monkeypatch.setattr(functional, "_check_conv_bn_relu_call",
                        lambda *a: checked.append(1) or check(*a))
    tuner.times.update({"aten": 0.5})

    def layer(x=x, w=w, rm=rm, rv=rv, padding=1):
        return functional.conv_bn_relu(x, w, rm, rv, padding=padding)

    first = layer()  # checked, and its fused candidate checked as it is timed
    assert checked and len(tuner.records()) == 1
    checked.clear()
    timed = []
    tuner._timer = lambda fn: timed.append(fn) or 1.0
    torch.testing.assert_close(layer(), first, rtol=0, atol=0)
    assert (checked, timed) == ([], [])
    expected = reference.conv_bn_relu(x, w, rm, rv, padding=1)
    torch.testing.assert_close(first, expected)

    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        layer(rm=torch.zeros(5))
    with pytest.raises(TypeError, match="conv_weight has dtype torch.float64"):
        layer(w=w.double())
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        functional.conv_bn_relu(x, w, rm, rv, padding=1, stride=[1, 1, 1])
    for changed in (lambda: layer(padding=0),
                    lambda: layer(x=x.contiguous(memory_format=torch.channels_last))):
        checked.clear()
        changed()
        assert checked
    checked.clear()
    with torch.no_grad():
        layer()
    assert checked
    monkeypatch.setenv("RESNET_FAST_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(reference, "conv_bn_relu",
                        lambda *a, **k: calls.append(1) or expected)
    checked.clear()
    layer()
    assert checked and calls == [1]


def test_a_decided_batch_norm_site_checks_a_changed_call(tuner, monkeypatch):
    """The BatchNorm ops: a decided site is not checked again; a residual of another shape is."""
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    checked = []
    check = functional._check_bn_act_call
    monkeypatch.setattr(functional, "_check_bn_act_call", lambda *a: checked.append(1) or check(*a))
    out = functional.batch_norm_add_relu(x, r, rm, rv, None, None, True)
    assert checked
    checked.clear()
    again = functional.batch_norm_add_relu(x, r, rm.clone(), rv.clone(), None, None, True)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert not checked
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        functional.batch_norm_add_relu(x, r[:, :, :2], rm, rv, None, None, True)
    assert checked
