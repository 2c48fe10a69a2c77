"""Bad input gets a clear error naming the argument; backend selection never falls back silently."""

import subprocess
import sys

import pytest
import torch

import resnet_fast
from resnet_fast import backends, functional

C = 4


def _on(device, over):
    """``over``'s tensors moved to ``device``, but those on the meta device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in over.items()}


def _args(device, **over):
    a = dict(input=torch.randn(2, C, 3, 3, device=device),
             running_mean=torch.zeros(C, device=device), running_var=torch.ones(C, device=device),
             weight=torch.ones(C, device=device), bias=torch.zeros(C, device=device),
             training=True)
    a.update(over)
    return a


def _call(device, **over):
    a = _args(device, **over)
    residual = a.pop("residual", None)
    if residual is None:
        return functional.batch_norm_relu(**a)
    return functional.batch_norm_add_relu(residual=residual, **a)


@pytest.mark.parametrize(
    "over,error,pattern",
    [
        (dict(input=torch.randn(2, C, 3)), ValueError, r"input must be 4-D.*got 3-D"),
        (dict(input=torch.randn(2, C, 3, 3, 1)), ValueError, r"input must be 4-D"),
        (dict(input=torch.ones(2, C, 3, 3, dtype=torch.int64)), TypeError,
         r"input must be a floating-point tensor.*int64"),
        (dict(input=[1.0]), TypeError, r"input must be a Tensor"),
        (dict(running_mean=torch.zeros(C + 1)), ValueError,
         r"running_mean must have shape \(4,\).*got \(5,\)"),
        (dict(weight=torch.ones(C, 1)), ValueError, r"weight must have shape \(4,\)"),
        (dict(bias=torch.zeros(C, dtype=torch.int32)), TypeError, r"bias must be a floating"),
        (dict(running_var=None), ValueError, r"running_mean and running_var must both be given"),
        (dict(input=torch.randn(1, C, 1, 1)), ValueError,
         r"Expected more than 1 value per channel when training"),
        (dict(residual=torch.randn(2, C, 3, 4)), ValueError,
         r"residual must have the input's shape \(2, 4, 3, 3\), got \(2, 4, 3, 4\)"),
        (dict(residual=torch.randn(2, C, 3, 3, dtype=torch.float64)), TypeError,
         r"residual has dtype torch.float64 but input has dtype torch.float32"),
        (dict(momentum=None), ValueError, r"momentum=None .* needs num_batches_tracked"),
        (dict(backend="tpu"), ValueError, r"unknown backend \(backend='tpu'\); expected one of"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_input_names_the_argument(device, over, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(device, **_on(device, over))


def test_training_with_one_value_per_channel_is_allowed_in_eval(device):
    y = _call(device, input=torch.randn(1, C, 1, 1, device=device), training=False)
    assert y.shape == (1, C, 1, 1)


def test_mixed_devices_rejected(device):
    if device.type != "cuda":
        x = torch.randn(2, C, 3, 3, device="meta")
        with pytest.raises(ValueError, match=r"running_mean is on cpu but input is on meta"):
            functional.batch_norm_relu(x, torch.zeros(C), torch.ones(C), training=True)
    else:
        with pytest.raises(ValueError, match=r"running_mean is on cpu but input is on cuda"):
            _call(device, running_mean=torch.zeros(C))


def test_dual_requires_tracking_together(device):
    x = torch.randn(2, C, 3, 3, device=device)
    s = torch.zeros(C, device=device), torch.ones(C, device=device)
    with pytest.raises(ValueError, match="residual_running_mean must both be given or both None"):
        functional.dual_batch_norm_add_relu(x, x.clone(), *s, None, None, None, None, None, None,
                                            training=True)
    with pytest.raises(ValueError, match=r"residual_weight must have shape \(4,\)"):
        functional.dual_batch_norm_add_relu(x, x.clone(), *s, None, None, *s, torch.ones(3),
                                            None, training=True)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' .* not available: .*CUDA"):
        _call("cpu", weight=None, bias=None, backend="cuda")


def test_env_override_and_unknown_env_value(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"unknown backend \(RESNET_FAST_BACKEND='fastest'\)"):
        backends.resolve_backend(None, cpu)
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.resolve_backend(None, cpu) == resnet_fast.available_backends(cpu)[0]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = resnet_fast.unavailable_reason("triton", "cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_available_backends_lists_default_first():
    assert resnet_fast.available_backends("cpu")[0] == "cpu"
    assert "reference" in resnet_fast.available_backends("cpu")
    assert resnet_fast.unavailable_reason("reference", "cpu") is None


def test_import_without_extension():
    """Without resnet_fast._C (it defines the ops) the import fails saying how to build it."""
    code = "import sys; sys.modules['resnet_fast._C'] = None\nimport resnet_fast\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "resnet_fast._C could not be imported" in last
    assert "pip install -e . --no-build-isolation" in last


def test_dual_cumulative_average_with_unequal_counters_changes_nothing(device):
    x = torch.randn(2, C, 3, 3, device=device)
    stats = [torch.zeros(C, device=device), torch.ones(C, device=device)]
    rstats = [torch.zeros(C, device=device), torch.ones(C, device=device)]
    count, rcount = torch.tensor(2, device=device), torch.tensor(3, device=device)
    with pytest.raises(ValueError, match="num_batches_tracked and residual_num_batches_tracked"):
        functional.dual_batch_norm_add_relu(x, x.clone(), *stats, None, None, *rstats, None, None,
                                            training=True, momentum=None,
                                            num_batches_tracked=count,
                                            residual_num_batches_tracked=rcount)
    assert count.item() == 2 and rcount.item() == 3


def _conv_call(device, **over):
    a = dict(input=torch.randn(2, C, 6, 6, device=device),
             conv_weight=torch.randn(8, C, 3, 3, device=device),
             running_mean=torch.zeros(8, device=device), running_var=torch.ones(8, device=device),
             training=True, padding=1)
    a.update(over)
    return functional.conv_bn_relu(**a)


@pytest.mark.parametrize(
    "over,error,pattern",
    [
        (dict(input=torch.randn(2, C, 6)), ValueError, r"input must be 4-D.*got 3-D"),
        (dict(conv_weight=torch.randn(8, C, 3)), ValueError,
         r"conv_weight must be 4-D \(out_channels, in_channels / groups, kH, kW\)"),
        (dict(conv_weight=torch.randn(8, C + 1, 3, 3)), ValueError,
         r"conv_weight of shape \(8, 5, 3, 3\) expects 5 input channels with groups=1, but "
         r"input has 4"),
        (dict(conv_weight=torch.randn(8, 2, 3, 3), groups=3), ValueError,
         r"must both be divisible by groups \(3\)"),
        (dict(conv_weight=torch.randn(8, C, 3, 3, dtype=torch.float64)), TypeError,
         r"conv_weight has dtype torch.float64 but input has dtype torch.float32"),
        (dict(conv_weight=torch.randn(8, C, 3, 3, device="meta")), ValueError,
         r"conv_weight is on meta but input is on"),
        (dict(stride=(1, 1, 1)), ValueError, r"stride must be an int or a pair of ints"),
        (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
        (dict(padding=-1), ValueError, r"padding must be >= 0, got -1"),
        (dict(dilation=[1, 0]), ValueError, r"dilation must be >= 1"),
        (dict(padding=0, input=torch.randn(2, C, 2, 2)), ValueError,
         r"input of spatial size \(2, 2\) is too small for conv_weight"),
        (dict(running_mean=torch.zeros(C)), ValueError, r"running_mean must have shape \(8,\)"),
        (dict(conv_bias=torch.zeros(C)), ValueError, r"conv_bias must have shape \(8,\)"),
        (dict(residual=torch.randn(2, 8, 5, 5)), ValueError,
         r"residual must have the conv output's shape \(2, 8, 6, 6\), got \(2, 8, 5, 5\)"),
        (dict(residual=torch.randn(2, 8, 6, 6), defer=True), ValueError,
         r"defer=True .* residual must be None"),
        (dict(input=torch.randn(1, C, 1, 1), padding=1), ValueError,
         r"Expected more than 1 value per channel when training"),
        (dict(backend="tpu"), ValueError, r"unknown backend \(backend='tpu'\)"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_conv_bad_input_names_the_argument(device, over, error, pattern):
    with pytest.raises(error, match=pattern):
        _conv_call(device, **_on(device, over))
