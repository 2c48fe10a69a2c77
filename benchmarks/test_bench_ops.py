"""pytest-benchmark: each fused op, eager vs every resnet_fast backend, one group per op.

Training (forward + backward) and eval, channels_last, float32 on the CPU (small shapes from a
ResNet at a small input), bfloat16 on CUDA (ResNet-50 shapes at batch 64). Eager is the
definition in :mod:`resnet_fast.reference`, which runs the separate PyTorch ops.

    pytest benchmarks/test_bench_ops.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from resnet_fast import functional, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
SHAPE = (64, 256, 28, 28) if GPU else (8, 64, 16, 16)  # (N, C, H, W) of the activation

OPS = ("batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu", "conv_bn_relu")
MODES = ("train", "eval")


def _inputs(op: str):
    """The op's positional arguments (before ``training``) and the tensors to differentiate."""
    torch.manual_seed(0)
    N, C, H, W = SHAPE
    cl = torch.channels_last

    def act():
        return torch.randn(SHAPE, device=DEVICE, dtype=DTYPE).contiguous(
            memory_format=cl).requires_grad_()

    def bn():
        return [torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE),
                (torch.rand(C, device=DEVICE) + 0.5).requires_grad_(),
                torch.randn(C, device=DEVICE).requires_grad_()]

    x = act()
    if op == "batch_norm_relu":
        args = [x, *bn()]
    elif op == "batch_norm_add_relu":
        args = [x, act(), *bn()]
    elif op == "dual_batch_norm_add_relu":
        args = [x, act(), *bn(), *bn()]
    else:  # conv_bn_relu: a 3x3 conv C -> C, padding 1
        w = (torch.randn(C, C, 3, 3, device=DEVICE, dtype=DTYPE) / (3 * C ** 0.5)).contiguous(
            memory_format=cl).requires_grad_()
        args = [x, w, *bn()]
    grads = [t for t in args if t.requires_grad]
    return args, grads


def _call(op: str, provider: str, args, training: bool):
    kwargs = {"padding": 1} if op == "conv_bn_relu" else {}
    if provider == "eager":
        return getattr(reference, op)(*args, training, **kwargs)
    return getattr(functional, op)(*args, training, backend=provider, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, timed, op, mode, provider):
    args, grads = _inputs(op)
    benchmark.group = f"{op} {mode} {'x'.join(map(str, SHAPE))} {str(DTYPE)[6:]} channels_last"
    benchmark.extra_info.update(op=op, mode=mode, provider=provider, shape=list(SHAPE),
                                dtype=str(DTYPE)[6:], device=str(DEVICE))
    if mode == "train":
        out = _call(op, provider, args, True)
        grad_out = torch.randn_like(out)

        def work():
            y = _call(op, provider, args, True)
            return torch.autograd.grad(y, grads, grad_out)
    else:
        def work():
            with torch.no_grad():
                return _call(op, provider, args, False)
    fn = timed(work)
    fn()  # warm-up: first-call costs (kernel compilation, weight packing) are not timed
    result = benchmark(fn)
    assert result is not None
