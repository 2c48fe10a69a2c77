"""Checking a fused op against the float64 reference, under resnet_fast's tolerance policy.

Tolerance policy: for every compared quantity (the output, the gradient of every input and
parameter, the updated running statistics), the fused result must have eager's shape and dtype
(and, for the activations, its memory format), and its largest absolute error against the
float64 reference may be at most twice the error of eager PyTorch in the same dtype against
that reference (:mod:`resnet_fast.reference` on the activations in that dtype and the
per-channel tensors in its accumulation dtype, :func:`acc_dtype_of`: float32 for half and
bfloat16, whose BatchNorm forward ATen computes in float32, rounding its output once), plus a
floor of a few units in the last place of the activations' dtype times the reference's scale:
``FLOOR[dtype] * max(1, max|reference|)`` (:func:`tolerance`; the 1 keeps a quantity that is 0
by symmetry, such as a conv bias gradient under batch statistics or any input gradient of a
channel of two values, from having no floor at all). The running statistics get the floor of
their own dtype: with bfloat16 activations they are float32, computed from the rounded inputs
at float32 precision, so a dropped Bessel correction or a wrong momentum fails in bfloat16 too.
So do the per-channel statistics a kernel returns and no eager op does (quantities named
``stats_*``: a batch mean, variance or invstd): eager's are computed in the accumulation dtype
from the rounded inputs (:func:`batch_stats`).

Non-finite values: NaN, +inf and -inf must appear in exactly the places where eager PyTorch (the
reference in the case's dtype) puts them, in every quantity; the errors are then taken over the
elements that are finite in all three runs. A case can carry one such value (or a huge finite
one) in its input or residual (:attr:`Case.special`) to check exactly that.

``check_case`` runs one :class:`Case` three ways from the same float64 master inputs
(:func:`run_case`): the reference in float64, the reference in the case's dtype (eager), and the
fused op with the chosen backend, then compares. ``python -m resnet_fast verify`` and the tests
both use it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from resnet_fast import functional, reference
from resnet_fast._conventions import acc_dtype_of, conv_output_shape

__all__ = ["FLOOR", "Case", "Conv", "CaseResult", "check_case", "compare", "compare_over_draws",
           "compare_redrawn", "describe_failures", "batch_stats", "summed_terms", "tolerance",
           "layout_mismatch", "STRIDED_QUANTITIES", "run_case", "OPS", "CONV_OPS", "LAYOUTS", "ALL_LAYOUTS"]

# The floor of the tolerance relative to max(1, max|reference|), per dtype: a few units in the
# last place (4 for float32, 1 for the 16-bit types: float32 and bfloat16 pass every op test
# with 1), enough for a fused op that sums in another order than eager and too small for an
# eps in the wrong place, a dropped Bessel correction or a wrong momentum. In float64 eager is
# the reference itself, so the floor alone bounds the error: 1e-10, room for a whole model's
# float64 rounding in another order (up to 1e-13 measured) and far below any formula slip.
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}

# name -> (has residual, residual is BatchNorm'ed); conv_bn_relu's residual is its Conv's choice.
OPS = {
    "batch_norm_relu": (False, False),
    "batch_norm_add_relu": (True, False),
    "dual_batch_norm_add_relu": (True, True),
    "conv_bn_relu": (False, False),
}
CONV_OPS = ("conv_bn_relu",)  # the ops whose Case carries a Conv

# More draws of a case whose one draw failed on finite errors only (see compare_over_draws).
REDRAWS = 8

# The layouts every op test runs; strided is a non-dense view into a wider tensor. The
# property tests add expanded: stride 0 along W (the first column's values, broadcast).
LAYOUTS = ("contiguous", "channels_last", "strided")
ALL_LAYOUTS = LAYOUTS + ("expanded",)


@dataclasses.dataclass(frozen=True)
class Conv:
    """The conv layer of a ``conv_bn_relu`` case (square kernel, symmetric stride/padding)."""

    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    residual: bool = False
    relu: bool = True

    def describe(self) -> str:
        text = f"->{self.out_channels} k{self.kernel}s{self.stride}p{self.padding}"
        text += f"d{self.dilation}" if self.dilation != 1 else ""
        text += f"g{self.groups}" if self.groups != 1 else ""
        text += "+bias" if self.bias else ""
        text += "+res" if self.residual else ""
        return text + ("" if self.relu else " noact")

    def output_shape(self, input_shape) -> tuple[int, int, int, int]:
        k, pair = self.kernel, lambda v: (v, v)
        return conv_output_shape(input_shape, (self.out_channels, 1, k, k), pair(self.stride),
                                 pair(self.padding), pair(self.dilation))


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    training: bool = True
    track_running_stats: bool = True
    affine: bool = True
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    conv: Optional[Conv] = None  # conv_bn_relu only (default: Conv(out_channels=C))
    # (tensor, value): one element of "input" or "residual" (batch 0, channel 1 or 0, the first
    # row, the middle column) set to value, e.g. NaN, inf or 1e30.
    special: Optional[tuple[str, float]] = None
    # The input as input_offset + input_spread * (the drawn values): a mean far from 0 against
    # the spread (a constant channel with input_spread=0) tests how the kernels centre x.
    input_offset: float = 0.0
    input_spread: float = 1.0

    def __post_init__(self):
        if self.op in CONV_OPS and self.conv is None:
            object.__setattr__(self, "conv", Conv(self.shape[1]))

    @property
    def has_residual(self) -> bool:
        return self.conv.residual if self.conv is not None else OPS[self.op][0]

    def describe(self) -> str:
        mode = "train" if self.training else "eval"
        if not self.track_running_stats:
            mode += ",untracked"
        if self.momentum is None:
            mode += ",cma"
        if self.eps != 1e-5:
            mode += f",eps={self.eps:g}"
        if self.momentum not in (None, 0.1):
            mode += f",momentum={self.momentum:g}"
        if not self.affine:
            mode += ",no-affine"
        conv = "" if self.conv is None else " " + self.conv.describe()
        if (self.input_offset, self.input_spread) != (0.0, 1.0):
            mode += f",input={self.input_offset:g}+{self.input_spread:g}*x"
        special = "" if self.special is None else f" {self.special[0]}={self.special[1]:g}"
        return (f"{self.op} {tuple(self.shape)}{conv} {str(self.dtype).replace('torch.', '')} "
                f"{self.layout} {mode}{special}")


@dataclasses.dataclass
class CaseResult:
    case: Case
    backend: str
    errors: dict[str, float]  # quantity -> fused max abs error vs float64
    eager_errors: dict[str, float]
    bounds: dict[str, float]
    # quantity -> how its shape, dtype or strides differ from eager's (its error is then inf)
    mismatches: dict[str, str] = dataclasses.field(default_factory=dict)
    # 1, or the draws whose mean errors judged the quantities one draw put past their bound
    draws: int = 1

    @property
    def passed(self) -> bool:
        return all(self.errors[k] <= self.bounds[k] for k in self.errors)

    @property
    def worst(self) -> str:
        """The quantity closest to (or furthest past) its bound (a counter, bound 0, only when
        it differs)."""
        def ratio(k: str) -> float:
            if self.bounds[k] == 0:
                return 0.0 if self.errors[k] == 0 else math.inf
            return self.errors[k] / self.bounds[k]

        return max(self.errors, key=ratio)

    def failures(self) -> list[str]:
        return describe_failures(self.errors, self.eager_errors, self.bounds, self.mismatches,
                                 self.draws)


def describe_failures(errors: dict[str, float], eager_errors: dict[str, float],
                      bounds: dict[str, float], mismatches: dict[str, str],
                      draws: int = 1) -> list[str]:
    """One line for each quantity past its bound: how its layout differs from eager's, that its
    NaN or inf are misplaced, or its error against its bound (and eager's; means over
    ``draws``)."""
    return [
        f"{k}: {mismatches[k]}" if k in mismatches else
        f"{k}: NaN or inf not where eager has them" if errors[k] == math.inf else
        f"{k}: {'mean ' if draws > 1 else ''}error {errors[k]:.3g} > bound "
        f"{bounds[k]:.3g} (eager {eager_errors[k]:.3g}"
        f"{f', over {draws} draws' if draws > 1 else ''})"
        for k in errors
        if not errors[k] <= bounds[k]
    ]


def _layout(t: Tensor, layout: str) -> Tensor:
    """``t`` (4-D) in the given layout; 'strided' is a non-dense view into a wider tensor."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = t.new_zeros((*t.shape[:3], 2 * t.shape[3]))
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded":
        return t[..., :1].expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(ALL_LAYOUTS)}")


def _master_inputs(case: Case, generator: torch.Generator) -> dict[str, Optional[Tensor]]:
    """Float64 master tensors of one case (CPU), drawn from ``generator``."""
    N, C, H, W = case.shape

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    residual_bn = OPS[case.op][1]
    # Per-channel offsets and scales so channels differ, centred so ReLU cuts about half.
    t = {"input": randn(N, C, H, W) * (0.5 + rand(1, C, 1, 1) * 2) + randn(1, C, 1, 1)}
    t["input"] = case.input_offset + case.input_spread * t["input"]
    out_shape = (N, C, H, W)
    if case.conv is not None:
        cv = case.conv
        fan_in = C // cv.groups * cv.kernel ** 2
        t["conv_weight"] = randn(cv.out_channels, C // cv.groups, cv.kernel,
                                 cv.kernel) / math.sqrt(fan_in)
        t["conv_bias"] = randn(cv.out_channels) * 0.5 if cv.bias else None
        out_shape = cv.output_shape(case.shape)
    N, C, H, W = out_shape
    t["grad_out"] = randn(N, C, H, W)
    t["residual"] = (randn(N, C, H, W) * (0.5 + rand(1, C, 1, 1))
                     + randn(1, C, 1, 1)) if case.has_residual else None
    for prefix in ("", "residual_") if residual_bn else ("",):
        t[prefix + "weight"] = (rand(C) + 0.5) * torch.sign(randn(C)) if case.affine else None
        t[prefix + "bias"] = randn(C) * 0.5 if case.affine else None
        t[prefix + "running_mean"] = randn(C) * 0.2 if case.track_running_stats else None
        t[prefix + "running_var"] = rand(C) + 0.5 if case.track_running_stats else None
        t[prefix + "num_batches_tracked"] = (torch.tensor(3, dtype=torch.long)
                                             if case.track_running_stats else None)
    if case.special is not None:
        name, value = case.special
        if t.get(name) is None:
            raise ValueError(f"{case.op} has no {name} to put {value} in")
        N, C, H, W = t[name].shape
        if N * C * H * W:
            t[name][0, min(1, C - 1), 0, W // 2] = value
    return t


# The quantities whose memory format must be eager's: the output and the input's gradient,
# which follow the input's. A parameter's gradient may come in either layout (autograd lays
# .grad out like the parameter when it accumulates it), and so may the residual's where the two
# activations' layouts coincide (eager's then follows the output's or the output gradient's).
STRIDED_QUANTITIES = ("output", "grad_input")
_GRAD_NAMES = ("input", "residual", "weight", "bias", "residual_weight", "residual_bias",
               "conv_weight", "conv_bias")
# Tensors in the activations' dtype whatever their rank; other 1-D ones are per-channel.
_ACTIVATION_DTYPE = ("conv_weight", "conv_bias")
_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked", "residual_running_mean",
               "residual_running_var", "residual_num_batches_tracked")


def _run(fn: Callable, case: Case, masters: dict, dtype: torch.dtype, device: torch.device,
         backend: Optional[str]) -> dict[str, Tensor]:
    """Runs ``fn`` on copies of the masters in ``dtype`` (per-channel tensors in its
    accumulation dtype) in the case's layout; returns the output, gradients and running
    statistics."""
    param_dtype = acc_dtype_of(dtype)
    t: dict[str, Optional[Tensor]] = {}
    for name, m in masters.items():
        if m is None:
            t[name] = None
        elif name in _ACTIVATION_DTYPE:
            t[name] = m.to(device=device, dtype=dtype, copy=True)
        elif m.dim() == 4:
            t[name] = _layout(m.to(device=device, dtype=dtype, copy=True), case.layout)
        else:
            t[name] = m.to(device=device, dtype=param_dtype if m.is_floating_point() else m.dtype,
                           copy=True)
    grad_inputs = [n for n in _GRAD_NAMES if t.get(n) is not None]
    for n in grad_inputs:
        t[n].requires_grad_(True)
    residual_bn = OPS[case.op][1]
    bn = [t["running_mean"], t["running_var"], t["weight"], t["bias"]]
    kwargs = {"num_batches_tracked": t["num_batches_tracked"]}
    if case.conv is not None:
        cv = case.conv
        args = [t["input"], t["conv_weight"]] + bn
        kwargs.update(conv_bias=t["conv_bias"], stride=cv.stride, padding=cv.padding,
                      dilation=cv.dilation, groups=cv.groups, residual=t["residual"],
                      relu=cv.relu)
    else:
        args = [t["input"]] + ([t["residual"]] if case.has_residual else []) + bn
    if residual_bn:
        args += [t["residual_running_mean"], t["residual_running_var"], t["residual_weight"],
                 t["residual_bias"]]
        kwargs["residual_num_batches_tracked"] = t["residual_num_batches_tracked"]
    if backend is not None:
        kwargs["backend"] = backend
    out = fn(*args, case.training, case.momentum, case.eps, **kwargs)
    grads = torch.autograd.grad(out, [t[n] for n in grad_inputs], t["grad_out"])
    result = {"output": out.detach()}
    result.update({f"grad_{n}": g for n, g in zip(grad_inputs, grads)})
    result.update({n: t[n] for n in _STAT_NAMES if t.get(n) is not None})
    return result


def _nonfinite_masks(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = t.detach().cpu()
    return t.isnan(), t == math.inf, t == -math.inf


def _max_error(a: Tensor, ref: Tensor, finite: Tensor) -> float:
    """Largest |a - ref| over the elements where ``finite`` holds."""
    d = (a.detach().to(device="cpu", dtype=torch.float64) - ref.cpu())[finite]
    if d.numel() == 0:
        return 0.0
    err = d.abs().max().item()
    return math.inf if math.isnan(err) else err


def run_case(case: Case, which: str, backend: Optional[str] = None,
             device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """One run of ``case``: ``which`` is "reference" (float64, CPU), "eager" (the reference in
    the case's dtype on ``device``) or "fused" (with ``backend``). Returns the output, the
    gradient of every input and parameter and the updated running statistics by name."""
    masters = _master_inputs(case, torch.Generator().manual_seed(seed))
    # Every run starts from the same values: the masters rounded to the case's dtype (and the
    # per-channel tensors to its accumulation dtype), so the float64 reference measures the
    # error of the computation, not of rounding the inputs.
    acc = acc_dtype_of(case.dtype)
    masters = {n: m if m is None or not m.is_floating_point()
               else m.to(case.dtype if m.dim() == 4 else acc).double()
               for n, m in masters.items()}
    if which == "reference":
        return _run(getattr(reference, case.op), case, masters, torch.float64,
                    torch.device("cpu"), None)
    if which == "eager":
        return _run(getattr(reference, case.op), case, masters, case.dtype, torch.device(device),
                    None)
    if which == "fused":
        return _run(getattr(functional, case.op), case, masters, case.dtype,
                    torch.device(device), backend)
    raise ValueError(f"which must be 'reference', 'eager' or 'fused', got {which!r}")


def check_case(case: Case, backend: Optional[str], device: torch.device | str = "cpu",
               seed: int = 0, redraws: int = REDRAWS) -> CaseResult:
    """Runs ``case`` with ``backend`` on ``device`` and compares it with the float64 reference
    and with eager PyTorch in the case's dtype, under the tolerance policy. A quantity whose
    shape, dtype or layout differ from eager's, or whose NaN or inf elements are not where
    eager has them, gets an infinite error. Where finite errors alone put quantities past their
    bound, the case is drawn ``redraws`` more times (seeds after ``seed``) and those quantities
    are judged on their mean error (:func:`compare_over_draws`; ``CaseResult.draws`` says
    how many draws a result averages)."""

    def runs(s: int):
        ref = run_case(case, "reference", seed=s)
        eager = run_case(case, "eager", device=device, seed=s)
        fused = run_case(case, "fused", backend, device, s)
        missing = [name for name in ref if name not in fused]
        if missing:
            raise AssertionError(f"{case.describe()}: fused run produced no "
                                 f"{', '.join(missing)}")
        return ref, eager, fused

    errors, eager_errors, bounds, mismatches, draws = compare_redrawn(runs, case.dtype, seed,
                                                                      redraws, case)
    return CaseResult(case, backend or "default", errors, eager_errors, bounds, mismatches,
                      draws)


def summed_terms(case: Case, ref: dict[str, Tensor]) -> dict[str, float]:
    """Quantities of ``case`` summed from terms far larger than themselves: with a huge finite
    value v (1e30) in a conv's input, the conv weight gradient sums v times the BatchNorm input
    gradient at that place, about max|grad_input| (~1e-29): terms of ~v * max|grad_input| whose
    rounding no float32 result escapes (eager's own weight gradient is 0 there only because its
    input gradient underflows to 0, an error of 100% of the reference's)."""
    if case.conv is None or case.special is None or case.special[0] != "input":
        return {}
    value = abs(case.special[1])
    if not math.isfinite(value) or "grad_input" not in ref:
        return {}
    grad_input = ref["grad_input"][ref["grad_input"].isfinite()]
    return {"grad_conv_weight": value * (grad_input.abs().max().item() if grad_input.numel()
                                         else 0.0)}


def _memory_format(t: Tensor) -> Optional[str]:
    """"contiguous" or "channels_last" where ``t`` is dense in exactly one of them; None where
    it is in both (C = 1 or H = W = 1: the layouts coincide), in neither, or not 4-D."""
    if t.dim() != 4:
        return None
    formats = [name for name, f in (("contiguous", torch.contiguous_format),
                                    ("channels_last", torch.channels_last))
               if t.is_contiguous(memory_format=f)]
    return formats[0] if len(formats) == 1 else None


def layout_mismatch(fused: Tensor, eager: Tensor, layout: bool = True) -> Optional[str]:
    """How ``fused`` differs from ``eager`` in shape, dtype, device type or (with ``layout``)
    memory format, where eager's has one (see ``_memory_format``); or None."""
    if fused.shape != eager.shape:
        return f"shape {tuple(fused.shape)}, eager {tuple(eager.shape)}"
    if fused.dtype != eager.dtype:
        return f"dtype {fused.dtype}, eager {eager.dtype}"
    if fused.device.type != eager.device.type:
        return f"device {fused.device}, eager {eager.device}"
    expected = _memory_format(eager)
    if layout and expected is not None and _memory_format(fused) != expected:
        return f"strides {fused.stride()}, eager's {eager.stride()} ({expected})"
    return None


def batch_stats(input: Tensor, dtype: torch.dtype) -> Tensor:
    """(2, C): the per-channel mean and biased variance of ``input`` (N, C, H, W) over N, H and
    W, computed by eager PyTorch in ``dtype`` from ``input``'s values as they are: in the
    accumulation dtype of ``input``'s (:func:`acc_dtype_of`), eager's counterpart of a kernel's
    batch statistics; in float64, their reference."""
    var, mean = torch.var_mean(input.to(dtype), (0, 2, 3), unbiased=False)
    return torch.stack([mean, var])


def tolerance(reference: Tensor, eager_error: float, dtype: torch.dtype,
              terms: float = 1.0) -> float:
    """The policy's bound on the error of a quantity of ``dtype`` whose float64 reference is
    ``reference`` (its finite elements) and whose eager error is ``eager_error``; ``terms``,
    where known, is the size of the largest term summed into it, when that exceeds 1."""
    scale = max(1.0, terms, reference.abs().max().item() if reference.numel() else 0.0)
    return 2 * eager_error + FLOOR[dtype] * scale


def _floor_dtype(name: str, eager: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype whose floor bounds quantity ``name``: a running statistic's (``running_*``) or
    a kernel's per-channel statistic's (``stats_*``) own (float32 with half or bfloat16
    activations: it is computed from the rounded inputs at float32 precision), else the
    activations' ``dtype`` (a gradient passes through a ReLU mask and values decided at the
    activations' precision), or the quantity's own where that is coarser."""
    if "running_" in name or "stats_" in name:
        return eager.dtype
    return max((dtype, eager.dtype), key=lambda d: torch.finfo(d).eps)


def compare(ref: dict[str, Tensor], eager: dict[str, Tensor], fused: dict[str, Tensor],
            dtype: torch.dtype, terms: Optional[dict[str, float]] = None
            ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The tolerance policy over named quantities: (fused errors, eager errors, bounds), each
    by name, for the float64 reference ``ref`` and the runs ``eager`` and ``fused``
    (activations in ``dtype``; each quantity's floor is that of ``dtype``, of its own dtype for
    the running statistics and a kernel's ``stats_*``, see :func:`tolerance`; ``terms``: the
    size of the largest term summed into a quantity, by name, where it is known to exceed the
    result). A fused quantity passes when its error is at most its bound; one whose shape or
    dtype (or, for :data:`STRIDED_QUANTITIES`, memory format) differ from eager's
    (:func:`layout_mismatch`), or whose NaN or inf elements are not where eager has them, gets
    an infinite error. Integer quantities (counters) must be equal (error 0, else infinite;
    bound 0)."""
    errors, eager_errors, bounds = {}, {}, {}
    for name, r in ref.items():
        if not r.is_floating_point():
            errors[name] = 0.0 if torch.equal(fused[name].cpu(), r.cpu()) else math.inf
            eager_errors[name] = bounds[name] = 0.0
            continue
        e_masks, f_masks = _nonfinite_masks(eager[name]), _nonfinite_masks(fused[name])
        finite = r.isfinite() & ~e_masks[0] & ~e_masks[1] & ~e_masks[2]
        eager_errors[name] = _max_error(eager[name], r, finite)
        bounds[name] = tolerance(r[finite], eager_errors[name],
                                 _floor_dtype(name, eager[name], dtype),
                                 (terms or {}).get(name, 1.0))
        same = (layout_mismatch(fused[name], eager[name], name in STRIDED_QUANTITIES) is None
                and all(torch.equal(e, f) for e, f in zip(e_masks, f_masks)))
        errors[name] = _max_error(fused[name], r, finite) if same else math.inf
    return errors, eager_errors, bounds


def compare_over_draws(draws, dtype: torch.dtype, case: Optional[Case] = None
                       ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The tolerance policy on the mean over several draws of the same case: ``draws`` yields
    ``(ref, eager, fused)`` runs as :func:`compare` takes them (of ``case``, where given, for
    its :func:`summed_terms`); returns the mean fused errors, mean eager errors and mean bounds
    by name.

    Where a quantity is small against the terms it is summed from (a conv weight gradient
    under batch statistics, which a BatchNorm's scale invariance makes orthogonal to the
    weight; a model's loss, one number at the end of 50 layers; a channel of a few values),
    what eager and the fused op return is rounding noise, and one draw cannot order two
    noises: on a 1x1 conv 3->1 over 5 values eager's error exceeds twice the fused one in 7%
    (float32) and 33% (bfloat16) of draws, and the reverse in 12% and 8%. Such a quantity is
    compared on its mean error: a kernel that loses precision still fails, a lucky eager draw
    does not. A NaN, inf or layout mismatch in any draw makes the mean infinite."""
    results = [compare(ref, eager, fused, dtype,
                       None if case is None else summed_terms(case, ref))
               for ref, eager, fused in draws]
    if not results:
        raise ValueError("compare_over_draws needs at least one draw")

    def mean(i: int) -> dict[str, float]:
        return {k: sum(r[i][k] for r in results) / len(results) for k in results[0][i]}

    return mean(0), mean(1), mean(2)


def compare_redrawn(runs: Callable[[int], tuple[dict, dict, dict]], dtype: torch.dtype,
                    seed: int = 0, redraws: int = REDRAWS, case: Optional[Case] = None
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, float],
                               dict[str, str], int]:
    """The tolerance policy on a case that ``runs(s)`` draws with seed ``s`` as ``(ref, eager,
    fused)`` (as :func:`compare` takes them; of ``case``, where given, for its
    :func:`summed_terms`): :func:`compare` on the draw of ``seed``, and where finite errors
    alone put quantities past their bound, those quantities judged on their mean over
    ``redraws`` more draws (the seeds after ``seed``, :func:`compare_over_draws`). Returns the
    errors, eager errors and bounds by name, how the first draw's quantities differ from eager's
    in layout (:func:`layout_mismatch`, by name, where they do) and the number of draws the
    results average (1, or 1 + ``redraws``)."""
    ref, eager, fused = runs(seed)
    errors, eager_errors, bounds = compare(ref, eager, fused, dtype,
                                           None if case is None else summed_terms(case, ref))
    mismatches = {name: m for name in ref
                  if (m := layout_mismatch(fused[name], eager[name],
                                           name in STRIDED_QUANTITIES)) is not None}
    failing = [k for k in errors if not errors[k] <= bounds[k]]
    if not (failing and redraws and all(math.isfinite(errors[k]) for k in failing)):
        return errors, eager_errors, bounds, mismatches, 1
    mean = compare_over_draws((runs(s) for s in range(seed + 1, seed + 1 + redraws)), dtype,
                              case)
    for k in failing:
        errors[k], eager_errors[k], bounds[k] = (m[k] for m in mean)
    return errors, eager_errors, bounds, mismatches, 1 + redraws
