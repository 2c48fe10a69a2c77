"""Whole fused ResNets on the ``triton`` backend against the eager reference models, under the
tolerance policy (``resnet_fast.verify.compare``: float64 reference, eager in the same dtype).

Without a GPU the Triton kernels run under Triton's interpreter, one Python step per 16x16x16
tile, so the models are cut to what the interpreter can run: torchvision's stem (7x7 stride-2
conv + BatchNorm + ReLU, max-pool), one block in each of ``layer1`` and ``layer2`` and the
head; ``layer3`` and ``layer4`` are identities (their blocks are ``layer2``'s at more channels).
Batch 2, 16x16 input. Every BatchNorm gets non-trivial parameters and running statistics.

* ResNet-18's block (BasicBlock): ``layer1`` ends on an identity shortcut, ``layer2`` (stride
  2) on a downsample: conv1's BatchNorm + ReLU deferred into conv2's load, and in training the
  dual block end (downsample BN + BN2 + add + ReLU in one op).
* ResNet-50's block (Bottleneck, width_per_group 16): two deferred hand-offs per block and a
  downsample in both stages.
* ``memory_efficient=True``: the stem's conv, each block end's conv and the downsample's
  recompute their output in backward (the block end as a shortcut conv + a conv with residual).

Compared: one training step (logits, loss, every parameter gradient, every running statistic
and batch counter), float32 and float64 (TRAINING_CASES), and eval logits and loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resnet_fast import models, reference
from resnet_fast.verify import compare

from test_models import NUM_CLASSES, make_input, randomize_batch_norms, reference_twin, \
    run_step

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.parametrize("backend", ["triton"], indirect=True)]

BLOCKS = {"resnet18": ("BasicBlock", {}), "resnet50": ("Bottleneck", {"width_per_group": 16})}


def tiny_resnet(arch: str, memory_efficient: bool = False):
    """(fused model on the triton backend, its reference twin): ``arch``'s block, one per stage,
    cut after ``layer2`` (see the module docstring)."""
    block, kwargs = BLOCKS[arch]

    def make(mod):
        model = mod.ResNet(getattr(mod, block), [1, 1, 1, 1], num_classes=NUM_CLASSES, **kwargs)
        model.layer3 = model.layer4 = nn.Identity()
        model.fc = nn.Linear(128 * model.layer2[0].expansion, NUM_CLASSES)
        return model

    torch.manual_seed(0)
    fused = randomize_batch_norms(make(models))
    fused.set_backend("triton").set_memory_efficient(memory_efficient)
    return fused, reference_twin(fused, lambda: make(reference))


def assert_policy(fused, ref, dtype, *, train: bool) -> None:
    """One step of ``fused`` and of ``ref`` in ``dtype`` and of a float64 copy of ``ref``, from
    the same input: every quantity of ``run_step`` within the policy."""
    x, target = make_input(size=16)
    kw = dict(train=train, backward=train)
    ref64 = run_step(copy.deepcopy(ref).double(), x.double(), target, **kw)
    eager = run_step(ref.to(dtype), x.to(dtype), target, **kw)
    got = run_step(fused.to(dtype), x.to(dtype), target, **kw)
    assert got.keys() == ref64.keys()
    errors, eager_errors, bounds = compare(ref64, eager, got, dtype)
    failures = [f"{name}: error {errors[name]:.3g} > bound {bounds[name]:.3g} "
                f"(eager {eager_errors[name]:.3g})" for name in errors
                if not errors[name] <= bounds[name]]
    assert not failures, "\n".join(failures)


# Each path once, in float32 (about 20-40 s a step under the interpreter; every path is checked
# in float64 op by op in tests/test_ops_registration.py).
TRAINING_CASES = [
    ("resnet18", False, torch.float32), ("resnet50", False, torch.float32),
    ("resnet18", True, torch.float32),
]


@pytest.mark.parametrize("arch,memory_efficient,dtype", [
    pytest.param(*case, id=f"{case[0]}{'-memory_efficient' if case[1] else ''}-{case[2]}")
    for case in TRAINING_CASES])
def test_training_step(backend, arch, memory_efficient, dtype):
    assert_policy(*tiny_resnet(arch, memory_efficient), dtype, train=True)


def test_eval_logits(backend):
    """The one-pass eval path (BatchNorm folded into the conv's epilogue), the shortcut and
    the block end each one call, in ResNet-50's blocks."""
    assert_policy(*tiny_resnet("resnet50"), torch.float32, train=False)
