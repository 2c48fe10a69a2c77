"""pytest-benchmark: a ResNet-18 training step and eval forward, eager vs fused, one group each.

The training step is one SGD step (forward, cross-entropy, backward, ``optimizer.step()``),
channels_last. On the CPU: the small-input ResNet-18 at batch 8 x 32x32, float32; on CUDA: the
ImageNet ResNet-18 at batch 64 x 224x224 under bfloat16 autocast. Eager is the model of
:mod:`resnet_fast.reference`, fused that of :mod:`resnet_fast.models` (one per available
backend), both from the same weights. ``benchmarks/bench_model.py`` measures more (ResNet-50,
torch.compile, memory).

    pytest benchmarks/test_bench_model.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import models, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
BATCH, SIZE, SMALL_INPUT = (64, 224, False) if GPU else (8, 32, True)


def _model(provider: str) -> torch.nn.Module:
    torch.manual_seed(0)
    state = reference.resnet18(small_input=SMALL_INPUT, num_classes=10).state_dict()
    if provider == "eager":
        model = reference.resnet18(small_input=SMALL_INPUT, num_classes=10)
    else:
        model = models.resnet18(small_input=SMALL_INPUT, num_classes=10, backend=provider)
    model.load_state_dict(state)
    return model.to(DEVICE, memory_format=torch.channels_last)


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if GPU else contextlib.nullcontext()


@pytest.mark.parametrize("mode", ("train", "eval"))
def test_resnet18(benchmark, timed, mode, provider):
    model = _model(provider)
    torch.manual_seed(1)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    benchmark.group = f"resnet18 {mode} {BATCH}x3x{SIZE}x{SIZE}" + (" bf16" if GPU else "")
    benchmark.extra_info.update(model="resnet18", mode=mode, provider=provider, batch=BATCH,
                                size=SIZE, device=str(DEVICE))
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def work():
            opt.zero_grad(set_to_none=True)
            with _autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss
    else:
        model.eval()

        def work():
            with torch.no_grad(), _autocast():
                return model(x)
    fn = timed(work)
    fn()  # warm-up
    result = benchmark(fn)
    assert torch.isfinite(result.float()).all()
