"""Checking a fused op against the float64 reference, under resnet_fast's tolerance policy.

Tolerance policy: for every compared quantity (the output, the gradient of every input and
parameter, the updated running statistics), the fused result's largest absolute error against
the float64 reference may be at most twice the error of eager PyTorch in the same dtype against
that reference, plus a small floor: ``FLOOR[dtype] * max(1, max|reference|)``.

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
from resnet_fast.ops import acc_dtype_of, conv_output_shape

__all__ = ["FLOOR", "Case", "Conv", "CaseResult", "check_case", "compare", "run_case", "OPS",
           "CONV_OPS",
           "LAYOUTS", "ALL_LAYOUTS"]

# Relative floor of the tolerance, per dtype (times max(1, max|reference|)).
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# name -> (has residual, residual is BatchNorm'ed); conv_bn_relu's residual is its Conv's choice.
OPS = {
    "batch_norm_relu": (False, False),
    "batch_norm_add_relu": (True, False),
    "dual_batch_norm_add_relu": (True, True),
    "conv_bn_relu": (False, False),
}
CONV_OPS = ("conv_bn_relu",)  # the ops whose Case carries a Conv

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

    @property
    def passed(self) -> bool:
        return all(self.errors[k] <= self.bounds[k] for k in self.errors)

    @property
    def worst(self) -> str:
        """The quantity closest to (or furthest past) its bound."""
        return max(self.errors, key=lambda k: self.errors[k] / self.bounds[k])

    def failures(self) -> list[str]:
        return [
            f"{k}: NaN or inf not where eager has them" if self.errors[k] == math.inf else
            f"{k}: error {self.errors[k]:.3g} > bound {self.bounds[k]:.3g} "
            f"(eager {self.eager_errors[k]:.3g})"
            for k in self.errors
            if not self.errors[k] <= self.bounds[k]
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


_GRAD_NAMES = ("input", "residual", "weight", "bias", "residual_weight", "residual_bias",
               "conv_weight", "conv_bias")
# Tensors in the activations' dtype whatever their rank; other 1-D ones are per-channel.
_ACTIVATION_DTYPE = ("conv_weight", "conv_bias")
_STAT_NAMES = ("running_mean", "running_var", "residual_running_mean", "residual_running_var")


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
               seed: int = 0) -> CaseResult:
    """Runs ``case`` with ``backend`` on ``device`` and compares it with the float64 reference
    and with eager PyTorch in the case's dtype, under the tolerance policy. A quantity whose
    NaN or inf elements are not where eager has them gets an infinite error."""
    ref = run_case(case, "reference", seed=seed)
    eager = run_case(case, "eager", device=device, seed=seed)
    fused = run_case(case, "fused", backend, device, seed)
    missing = [name for name in ref if name not in fused]
    if missing:
        raise AssertionError(f"{case.describe()}: fused run produced no {', '.join(missing)}")
    errors, eager_errors, bounds = compare(ref, eager, fused, case.dtype)
    return CaseResult(case, backend or "default", errors, eager_errors, bounds)


def compare(ref: dict[str, Tensor], eager: dict[str, Tensor], fused: dict[str, Tensor],
            dtype: torch.dtype) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The tolerance policy over named quantities: (fused errors, eager errors, bounds), each
    by name, for the float64 reference ``ref`` and the runs ``eager`` and ``fused`` in
    ``dtype``. A fused quantity passes when its error is at most its bound; one whose NaN or
    inf elements are not where eager has them gets an infinite error. Integer quantities
    (counters) must be equal (error 0, else infinite; bound 0)."""
    errors, eager_errors, bounds = {}, {}, {}
    for name, r in ref.items():
        if not r.is_floating_point():
            errors[name] = 0.0 if torch.equal(fused[name].cpu(), r.cpu()) else math.inf
            eager_errors[name] = bounds[name] = 0.0
            continue
        e_masks, f_masks = _nonfinite_masks(eager[name]), _nonfinite_masks(fused[name])
        finite = r.isfinite() & ~e_masks[0] & ~e_masks[1] & ~e_masks[2]
        scale = max(1.0, r[finite].abs().max().item() if finite.any() else 0.0)
        eager_errors[name] = _max_error(eager[name], r, finite)
        bounds[name] = 2 * eager_errors[name] + FLOOR[dtype] * scale
        same_nonfinite = all(torch.equal(e, f) for e, f in zip(e_masks, f_masks))
        errors[name] = _max_error(fused[name], r, finite) if same_nonfinite else math.inf
    return errors, eager_errors, bounds
