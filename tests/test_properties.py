"""Property-based tests: random cases of every public fused function against eager PyTorch.

Hypothesis draws a ``verify.Case``: the op, odd shapes (an empty batch, 1x1 spatial, C = 1, odd
C), the dtype, the layout (contiguous, channels_last, a strided view, a stride-0 expanded view),
eval or training, tracked or untracked statistics, affine or not, eps and momentum (``None``:
the cumulative average), a conv's kernel, stride, padding, dilation, groups, bias, residual and
activation, the input's offset against its spread (10 + 0.1 x; a constant channel), and
optionally one NaN, inf or huge (1e30) element in the input or the residual.
Each case must either

* give eager's result under the tolerance policy (``verify.check_case``: NaN and inf exactly
  where eager has them, the rest within the bound), or
* be rejected by eager, and then by the fused op too, with a one-line ``ValueError``,
  ``TypeError`` or ``RuntimeError``, or
* be one the fused ops reject by design, with their one-line error: an empty input (a batch of
  size 0), which eager turns into an empty output

-- never a crash, a hang or a silent difference. The default profile is bounded and
derandomized (part of ``make test``; the profiles are in ``tests/conftest.py``);
``--hypothesis-profile=long`` runs many more random CPU cases by hand::

    .venv/bin/python -m pytest tests/test_properties.py --hypothesis-profile=long
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import resnet_fast
from resnet_fast.verify import ALL_LAYOUTS, OPS, Case, Conv, check_case, compare, run_case, \
    summed_terms

REJECTIONS = (ValueError, TypeError, RuntimeError, NotImplementedError)
SPECIAL_VALUES = (math.nan, math.inf, -math.inf, 1e30, -1e30)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
          max_side=5):
    op = draw(st.sampled_from(sorted(OPS)))
    N = draw(st.sampled_from((0, 1, 2, 3)))
    C = draw(st.sampled_from((1, 2, 3, 5, 17)))
    H = draw(st.integers(1, max_side))
    W = draw(st.integers(1, max_side))
    conv = None
    if op == "conv_bn_relu":
        out = draw(st.sampled_from((1, 2, 5)))
        groups = draw(st.sampled_from(tuple(g for g in (1, C) if out % g == 0)))
        conv = Conv(out, kernel=draw(st.sampled_from((1, 3))), stride=draw(st.sampled_from((1, 2))),
                    padding=draw(st.sampled_from((0, 1))), dilation=draw(st.sampled_from((1, 2))),
                    groups=groups, bias=draw(st.booleans()), residual=draw(st.booleans()),
                    relu=draw(st.booleans()))
    has_residual = conv.residual if conv is not None else OPS[op][0]
    special = None
    if draw(st.integers(0, 3)) == 0:
        where = draw(st.sampled_from(("input", "residual") if has_residual else ("input",)))
        special = (where, draw(st.sampled_from(SPECIAL_VALUES)))
    spread = draw(st.sampled_from((1.0, 1.0, 0.1, 0.0)))
    # A constant channel normalised by its batch statistics is exactly 0 before its bias: with
    # no bias (affine=False) it sits on the ReLU's kink, where the mask is decided by rounding
    # (eager's float64 BatchNorm of two equal values gives 1.8e-13, the fused kernels 0).
    affine = draw(st.booleans()) or spread == 0.0
    return Case(op, (N, C, H, W), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(ALL_LAYOUTS)), training=draw(st.booleans()),
                track_running_stats=draw(st.booleans()), affine=affine,
                momentum=draw(st.sampled_from((0.1, None, 0.0, 1.0, 0.7))),
                eps=draw(st.sampled_from((1e-5, 1e-3, 0.5))), conv=conv, special=special,
                input_offset=draw(st.sampled_from((0.0, 0.0, 10.0, -3.0))), input_spread=spread)


def _check_or_rejected(case: Case, backend: str) -> None:
    try:
        eager = run_case(case, "eager")
    except REJECTIONS as eager_error:
        with pytest.raises(REJECTIONS) as fused_error:
            run_case(case, "fused", backend)
        message = str(fused_error.value)
        assert message and "\n" not in message.strip(), (
            f"{case.describe()}: eager rejects it ({eager_error}); the fused op's error is not "
            f"one line: {message!r}")
        return
    try:
        result = check_case(case, backend)
    except ValueError as exc:
        if math.prod(case.shape) == 0 and str(exc).endswith(f"is empty (shape {case.shape})"):
            return
        raise AssertionError(f"{case.describe()}: eager runs it, the {backend} backend raises "
                             f"ValueError: {exc}") from exc
    except REJECTIONS as exc:
        raise AssertionError(f"{case.describe()}: eager runs it, the {backend} backend raises "
                             f"{type(exc).__name__}: {exc}") from exc
    failing = {k for k in result.errors if not result.errors[k] <= result.bounds[k]}
    if failing and not _eager_reproducible(case, eager, failing):
        reject()
    if failing and case.layout == "strided" and _matches_dense_eager(case, backend):
        return
    assert result.passed, f"{case.describe()} [{backend}]: " + "; ".join(result.failures())


def _eager_reproducible(case: Case, eager: dict, names: set[str], runs: int = 3) -> bool:
    """Whether eager gives the same ``names`` again on the same inputs. It does not always:
    torch 2.13's bfloat16 channels_last conv weight gradient on the CPU returns values that
    change from run to run, inf included, at some shapes (a 3x3 stride-2 conv over a one
    column input), where the fused op, which passes its conv the layout it computes in,
    returns the reference's zeros. Such a case has no eager answer to compare with."""
    for _ in range(runs):
        again = run_case(case, "eager")
        if not all(torch.equal(eager[k].nan_to_num(), again[k].nan_to_num()) for k in names):
            return False
    return True


def _matches_dense_eager(case: Case, backend: str) -> bool:
    """Whether the fused result on a strided view passes the policy against eager on the same
    values stored densely. Eager's BatchNorm has two CPU kernels: the dense one accumulates in
    float, the strided one in double, so where a huge value (1e30) overflows a float square,
    their NaN and inf differ (the output of the channel collapses to its bias, or a running
    variance updated with momentum 0 is NaN, in the dense kernel only). The fused ops compute
    on a dense copy; they follow eager's dense kernel (or are more accurate than it), whichever
    layout the input came in."""
    dense = dataclasses.replace(case, layout="contiguous")
    ref = run_case(case, "reference")
    errors, _, bounds = compare(ref, run_case(dense, "eager"), run_case(case, "fused", backend),
                                case.dtype, summed_terms(case, ref))
    return all(errors[k] <= bounds[k] for k in errors)


@given(case=cases())
def test_cpu_backend_matches_eager_or_rejects_like_it(case):
    _check_or_rejected(case, "cpu")


@pytest.fixture(scope="module")
def triton_on_cpu() -> None:
    """Skips, saying why, where the Triton backend cannot run on CPU tensors (its interpreter
    is set only where torch sees no GPU)."""
    reason = resnet_fast.unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"backend triton cannot run on cpu: {reason}")


@settings(max_examples=25)
@given(case=cases(dtypes=(torch.float32, torch.float64), max_side=3))
def test_triton_backend_matches_eager_or_rejects_like_it(triton_on_cpu, case):
    _check_or_rejected(case, "triton")
