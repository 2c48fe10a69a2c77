"""NaN and inf come out of every fused op where eager PyTorch puts them.

A training step whose activations went non-finite must look non-finite, as in eager: users stop
runs on a NaN loss. One element of the input (or the residual) is set to NaN, +inf, -inf or a
huge finite value (1e30, whose square overflows float32), and ``verify.check_case`` requires the
NaN, +inf and -inf elements of the output, of every gradient and of the running statistics to
be exactly eager's, and the finite elements to pass the tolerance policy. Per backend and
layout, training and eval, every op; a backend that cannot run here is a recorded skip.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import resnet_fast as rf
from resnet_fast import models, reference_models
from resnet_fast.verify import OPS, Case, Conv, check_case

SPECIALS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e30}


def _cases(layouts, specials, dtypes=(torch.float32,)) -> list:
    return list(_case_params(layouts, specials, dtypes))


def _case_params(layouts, specials, dtypes):
    for op in OPS:
        convs = [Conv(4, kernel=1, padding=0), Conv(4, relu=False)] if op == "conv_bn_relu" \
            else [None]
        wheres = ("input", "residual") if OPS[op][0] else ("input",)
        for conv in convs:
            for layout in layouts:
                for training in (True, False):
                    for where in wheres:
                        for name in specials:
                            for dtype in dtypes:
                                yield pytest.param(
                                    Case(op, (2, 3, 5, 5), dtype=dtype, layout=layout,
                                         training=training, conv=conv,
                                         special=(where, SPECIALS[name])),
                                    id=f"{op}-{conv.describe() if conv else ''}-{layout}-"
                                       f"{'train' if training else 'eval'}-{where}={name}-"
                                       f"{str(dtype)[6:]}")


def _check(case: Case, backend: str, device="cpu") -> None:
    result = check_case(case, backend, device)
    assert result.passed, f"{case.describe()} [{backend}]: " + "; ".join(result.failures())


@pytest.mark.parametrize("case", _cases(("contiguous", "channels_last", "strided"), SPECIALS))
def test_cpu_backend_nonfinite_like_eager(case):
    _check(case, "cpu")


@pytest.mark.parametrize("case", _cases(("contiguous", "channels_last"), ("nan", "inf"),
                                        dtypes=(torch.bfloat16,)))
def test_cpu_backend_nonfinite_like_eager_bfloat16(case):
    _check(case, "cpu")


# Triton runs under the interpreter here: one value of each kind that took a different path.
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("case", _cases(("contiguous", "channels_last"), ("nan", "huge")))
def test_triton_backend_nonfinite_like_eager(case, backend, device):
    _check(case, backend, device)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("case", _cases(("channels_last",), ("nan", "inf")))
def test_cuda_backend_nonfinite_like_eager(case, backend, device):
    _check(case, backend, device)


def test_relu_keeps_nan_from_the_scalar_and_vector_paths():
    """A NaN at every position of a row: the vector body and the scalar tail of the kernels."""
    x = torch.randn(2, 19, 3, 7).contiguous(memory_format=torch.channels_last)
    x[1, :, 2, 6] = math.nan  # the last row: channels 16..18 are the scalar tail
    x[0, 3, :, :] = math.nan
    ref = F.relu(F.batch_norm(x, torch.zeros(19), torch.ones(19), training=False))
    y = rf.batch_norm_relu(x, torch.zeros(19), torch.ones(19), training=False, backend="cpu")
    assert torch.equal(y.isnan(), ref.isnan())


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["default", "memory_efficient"])
def test_model_training_step_with_a_nan_input_is_nan_like_eager(memory_efficient, one_thread):
    """A NaN pixel in one image of a ResNet training step: the loss is NaN, and the gradients
    and running statistics that become NaN are eager's (the deferred hand-off, the dual block
    end and the recomputed convs included)."""
    torch.manual_seed(0)
    fused = models.resnet18(num_classes=4, small_input=True,
                            memory_efficient=memory_efficient).train()
    eager = reference_models.resnet18(num_classes=4, small_input=True).train()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    x[1, 0, 3, 3] = math.nan
    target = torch.tensor([0, 1])
    results = []
    for model in (eager, fused):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        results.append((loss.detach(),
                        {n: p.grad.isnan() for n, p in model.named_parameters()},
                        {n: b.isnan() for n, b in model.named_buffers()
                         if b.is_floating_point()}))
    (eager_loss, eager_grads, eager_bufs), (loss, grads, bufs) = results
    assert eager_loss.isnan() and loss.isnan()
    for name in eager_grads:
        assert torch.equal(grads[name], eager_grads[name]), name
    for name in eager_bufs:
        assert torch.equal(bufs[name], eager_bufs[name]), name


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_nonfinite_first_element_the_pivot_of_the_sums(op, value, backend, device):
    """One channel, one column: the special value lands on element (0, 0, 0, 0), the pivot of
    the channel's shifted sums (for the conv, a 1x1 conv carries it there)."""
    conv = Conv(1, kernel=1, padding=0) if op == "conv_bn_relu" else None
    _check(Case(op, (2, 1, 3, 1), conv=conv, special=("input", SPECIALS[value])), backend,
           device)
