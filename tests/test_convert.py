"""resnet_fast.convert: fusing an existing torchvision-style ResNet in place.

torchvision is not a dependency: its classes are stood in for by copies of their structure,
once under torchvision's own module and class names (recognised by name) and once under other
names (recognised by their children, "duck-typed")."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fast import models, reference_models
from resnet_fast.convert import ConvertWarning, convert
from resnet_fast.nn import FusedModule

from test_models import NUM_CLASSES, check_policy, make_input


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv3x3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)


class DuckBlock(nn.Module):
    """A BasicBlock written elsewhere: same children, its own class and forward."""

    def __init__(self, cin, cout, stride=1, bias=False):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout, bias=bias)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class DuckNet(nn.Module):
    """A small ResNet written elsewhere, with a conv bias before every BatchNorm (its own
    class and forward: the stem is not fused, the blocks are)."""

    def __init__(self, bias=False):
        super().__init__()
        self.conv1 = _conv3x3(3, 8, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = nn.Sequential(DuckBlock(8, 8, bias=bias))
        self.layer2 = nn.Sequential(DuckBlock(8, 16, 2, bias=bias), DuckBlock(16, 16, bias=bias))
        self.layer3 = nn.Sequential(DuckBlock(16, 16, bias=bias))
        self.layer4 = nn.Sequential(DuckBlock(16, 32, 2, bias=bias))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision_standins():
    """Classes named and placed as torchvision.models.resnet's (subclasses of the reference
    ones, which have the same constructor and forward)."""
    tv = {}
    for name, base in (("BasicBlock", reference_models.BasicBlock),
                       ("Bottleneck", reference_models.Bottleneck),
                       ("ResNet", reference_models.ResNet)):
        cls = types.new_class(name, (base,))
        cls.__module__ = "torchvision.models.resnet"
        # torchvision's classes define their own forward: give each class its own copy.
        cls.forward = types.FunctionType(base.forward.__code__, base.forward.__globals__)
        tv[name] = cls
    return tv


TV = _torchvision_standins()


def _model(kind="reference", block="basic", **kwargs):
    kwargs = dict(num_classes=NUM_CLASSES, small_input=True, **kwargs)
    if kind == "reference":
        blk = reference_models.BasicBlock if block == "basic" else reference_models.Bottleneck
        return reference_models.ResNet(blk, [1, 1, 1, 1], **kwargs)
    blk = TV["BasicBlock"] if block == "basic" else TV["Bottleneck"]
    return TV["ResNet"](blk, [1, 2, 1, 1], **kwargs)


def _convert_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvertWarning)
        return convert(model, **kwargs)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("kind", ["reference", "torchvision"])
def test_convert_shares_parameters_and_matches(kind, block):
    torch.manual_seed(0)
    model = _model(kind, block)
    eager = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert _convert_quietly(model) is model
    assert type(model) is models.ResNet
    assert all(type(b) is (models.BasicBlock if block == "basic" else models.Bottleneck)
               for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
               for b in layer)
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state

    x, target = make_input(size=16)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)
    check_policy(model, eager, x, target, torch.float64, train=True, backward=True)
    # the optimizer built before convert() still drives the converted model
    before = model.fc.weight.detach().clone()
    model.float()
    optimizer.zero_grad()
    F.cross_entropy(model(x), target).backward()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight.float())


def test_duck_typed_model_with_conv_bias():
    """Duck-typed blocks (conv bias before each BatchNorm) fuse; the stem of a model class that
    is not torchvision's keeps its own forward, and is reported."""
    torch.manual_seed(0)
    model = DuckNet(bias=True)
    eager = copy.deepcopy(model)
    with pytest.warns(ConvertWarning, match="DuckNet is not torchvision's ResNet"):
        convert(model)
    assert type(model) is DuckNet
    assert type(model.layer2[0]) is models.BasicBlock
    assert model.layer2[0].conv1.bias is not None
    x, target = make_input(size=16)
    check_policy(model, eager, x, target, torch.float64, train=True, backward=True)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)


def test_memory_efficient_argument():
    """convert(memory_efficient=True) sets every fused module to recompute its block ends; a
    training step still matches eager, conv biases before the BatchNorms included."""
    torch.manual_seed(0)
    model = DuckNet(bias=True)
    eager = copy.deepcopy(model)
    with pytest.warns(ConvertWarning, match="DuckNet is not torchvision's ResNet"):
        convert(model, memory_efficient=True)
    fused = [m for m in model.modules() if isinstance(m, FusedModule)]
    assert fused and all(m.memory_efficient for m in fused)
    x, target = make_input(size=16)
    check_policy(model, eager, x, target, torch.float64, train=True, backward=True)


def test_convert_inside_a_larger_model_and_idempotent():
    torch.manual_seed(0)
    outer = nn.Sequential(_model(), nn.Linear(NUM_CLASSES, 2))
    _convert_quietly(outer)
    assert type(outer[0]) is models.ResNet
    _convert_quietly(outer)  # converting again changes nothing and reports nothing
    x, _ = make_input(size=16)
    assert outer.eval()(x).shape == (2, 2)


def test_backend_argument():
    model = _convert_quietly(_model(), backend="reference")
    assert model.backend == "reference" and model.layer2[0].backend == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        convert(_model(), backend="bogus")


def test_non_module_is_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert({"conv1.weight": torch.zeros(1)})


def test_nothing_to_fuse_warns():
    with pytest.warns(ConvertWarning, match="found no ResNet block"):
        convert(nn.Linear(2, 2))


class SEBlock(DuckBlock):
    """A block with a squeeze-excitation child: not a BasicBlock."""

    def __init__(self, c):
        super().__init__(c, c)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out * self.se(out) + x)


class PreActBlock(nn.Module):
    """Same child names as a BasicBlock, but BatchNorm before each conv."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = _conv3x3(c, 2 * c)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.conv2 = _conv3x3(2 * c, c)
        self.relu = nn.ReLU()
        self.downsample = None

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        return self.conv2(self.relu(self.bn2(out))) + x


class SubclassedBlock(reference_models.BasicBlock):
    def forward(self, x):  # e.g. a stochastic-depth variant
        return super().forward(x) * 0.5


def _resnet_d_block():
    b = reference_models.BasicBlock(8, 16, 2, nn.Sequential(
        nn.AvgPool2d(2), reference_models.conv1x1(8, 16), nn.BatchNorm2d(16)))
    return b


def _silu_block():
    b = reference_models.BasicBlock(8, 8)
    b.relu = nn.SiLU()
    return b


def _hooked_conv_block():
    b = reference_models.BasicBlock(8, 8)
    b.conv1.register_forward_hook(lambda *a: None)
    return b


def _reflect_pad_block():
    b = reference_models.BasicBlock(8, 8)
    b.conv2.padding_mode = "reflect"
    return b


def _group_norm_block():
    b = reference_models.BasicBlock(8, 8)
    b.bn2 = nn.GroupNorm(2, 8)
    return b


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: SEBlock(8), r"children .* are neither"),
        (lambda: PreActBlock(8), r"bn1 has 8 features but conv1 has 16 output channels"),
        (lambda: SubclassedBlock(8, 8), r"SubclassedBlock overrides forward"),
        (_resnet_d_block, r"downsample is not nn.Sequential\(nn.Conv2d, nn.BatchNorm2d\)"),
        (_silu_block, r"relu is SiLU"),
        (_hooked_conv_block, r"conv1 is not a plain .*nn.Conv2d without hooks"),
        (_reflect_pad_block, r"conv2 is not a plain zero-padded"),
        (_group_norm_block, r"bn2 is not a plain nn.BatchNorm2d .*GroupNorm"),
    ],
    ids=["squeeze_excitation", "pre_activation", "overridden_forward", "resnet_d_downsample",
         "silu", "hooked_conv", "reflect_padding", "group_norm"],
)
def test_unrecognised_blocks_are_left_untouched_and_reported(make, reason):
    torch.manual_seed(0)
    model = nn.Sequential(reference_models.BasicBlock(8, 8), make())
    odd_class = type(model[1])
    with pytest.warns(ConvertWarning, match=reason) as record:
        convert(model)
    assert "1 (" in str(record[0].message)  # names the module
    assert type(model[0]) is models.BasicBlock  # the recognised block is still fused
    assert type(model[1]) is odd_class
    with pytest.raises(ValueError, match=reason):
        convert(nn.Sequential(make()), strict=True)


def test_strict_changes_nothing_on_refusal():
    model = nn.Sequential(reference_models.BasicBlock(8, 8), SEBlock(8))
    with pytest.raises(ValueError, match="not fused"):
        convert(model, strict=True)
    assert type(model[0]) is reference_models.BasicBlock


def test_resnet_with_overridden_forward_keeps_its_stem():
    class Features(reference_models.ResNet):
        def forward(self, x):
            return self.layer1(self.relu(self.bn1(self.conv1(x))))

    torch.manual_seed(0)
    model = Features(reference_models.BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES,
                     small_input=True)
    with pytest.warns(ConvertWarning, match="Features overrides forward"):
        convert(model)
    assert type(model) is Features  # its own forward still runs ...
    assert type(model.layer1[0]) is models.BasicBlock  # ... over fused blocks


def test_hooks_on_blocks_survive_and_fire():
    torch.manual_seed(0)
    model = _model()
    seen = []
    model.layer2[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _convert_quietly(model)
    x, _ = make_input(size=16)
    model(x)
    assert seen == [(2, 128, 8, 8)]


def test_converted_model_deepcopy_and_state_dict_to_fused_builder():
    torch.manual_seed(0)
    model = _convert_quietly(reference_models.resnet18(num_classes=NUM_CLASSES, small_input=True))
    clone = copy.deepcopy(model)
    fresh = models.resnet18(num_classes=NUM_CLASSES, small_input=True)
    fresh.load_state_dict(model.state_dict())
    x, _ = make_input(size=16)
    for m in (model, clone, fresh):
        m.eval()
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
