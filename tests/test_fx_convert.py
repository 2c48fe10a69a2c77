"""resnet_fast.convert by dataflow (resnet_fast.graph_fusion): timm's ResNet family and other
conv + BatchNorm networks, fused through torch.fx.

timm does not import on the CPU torch wheel: its ResNet (timm 1.0, ``timm/models/resnet.py``)
is stood in for by copies of its structure written here: the blocks' children and forwards,
the deep ("d", "t") stems, the average-pool shortcut, squeeze-excitation and ECA attention,
stochastic depth, and the model's ``forward_features`` / ``forward_head`` /
``reset_classifier``, at tiny widths and full depths.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fast import graph_plan
from resnet_fast.__main__ import main as cli_main
from resnet_fast.convert import ConvertWarning, convert, eager_batch_norms

from test_models import NUM_CLASSES, check_policy, make_input

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------- timm's structure


class SEModule(nn.Module):
    """timm.layers.SEModule: gate = sigmoid(fc2(relu(fc1(mean(x))))), x * gate."""

    def __init__(self, channels, rd_ratio=1 / 4):
        super().__init__()
        rd = max(2, int(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class EcaModule(nn.Module):
    """timm.layers.EcaModule: a 1-D conv across the channels of the pooled input."""

    def __init__(self, channels, gamma=2, beta=1):
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class DropPath(nn.Module):
    """timm.layers.DropPath: stochastic depth per sample, identity in eval."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


ATTN = {None: None, "se": SEModule, "eca": EcaModule}


class _TimmBlock(nn.Module):
    """What timm's BasicBlock and Bottleneck share: a forward calling the children named in
    ``chain`` in turn (the steps of timm's forward up to the last conv + BatchNorm), then the
    attention module (``se``), the drop path, the shortcut add and the last activation (the
    child named ``last_act``)."""

    chain: tuple[str, ...]
    last_act: str

    def forward(self, x):
        shortcut = x
        for name in self.chain:
            x = getattr(self, name)(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return getattr(self, self.last_act)(x)

    def _init_end(self, channels, act_layer, attn_layer, downsample, drop_path):
        self.se = None if attn_layer is None else attn_layer(channels)
        setattr(self, self.last_act, act_layer(inplace=True))
        self.downsample = downsample
        self.drop_path = drop_path


class BasicBlock(_TimmBlock):
    expansion = 1
    chain = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2")
    last_act = "act2"

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1,
                 base_width=64, act_layer=nn.ReLU, attn_layer=None, drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._init_end(planes, act_layer, attn_layer, downsample, drop_path)


class Bottleneck(_TimmBlock):
    expansion = 4
    chain = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3")
    last_act = "act3"

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1,
                 base_width=64, act_layer=nn.ReLU, attn_layer=None, drop_path=None):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self._init_end(outplanes, act_layer, attn_layer, downsample, drop_path)


def downsample_conv(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def downsample_avg(cin, cout, stride):
    pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, stride, ceil_mode=True,
                                                          count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, 1, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """timm.models.resnet.ResNet's structure and methods (stem_type '', 'deep', 'deep_tiered';
    avg_down; cardinality, base_width; attention; drop_path_rate)."""

    def __init__(self, block, layers, num_classes=NUM_CLASSES, channels=(4, 8, 8, 16),
                 cardinality=1, base_width=64, stem_width=4, stem_type="", avg_down=False,
                 act_layer=nn.ReLU, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.grad_checkpointing = False
        deep_stem = "deep" in stem_type
        inplanes = stem_width * 2 if deep_stem else channels[0]
        if deep_stem:
            stem_chs = (stem_width, stem_width)
            if "tiered" in stem_type:
                stem_chs = (3 * (stem_width // 4), stem_width)
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_chs[0], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(stem_chs[0]), act_layer(inplace=True),
                nn.Conv2d(stem_chs[0], stem_chs[1], 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(stem_chs[1]), act_layer(inplace=True),
                nn.Conv2d(stem_chs[1], inplanes, 3, stride=1, padding=1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        net_blocks, block_idx = sum(layers), 0
        for i, (planes, n) in enumerate(zip(channels, layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                make = downsample_avg if avg_down else downsample_conv
                downsample = make(inplanes, planes * block.expansion, stride)
            blocks = []
            for j in range(n):
                dpr = drop_path_rate * block_idx / max(1, net_blocks - 1)
                blocks.append(block(inplanes, planes, stride if j == 0 else 1,
                                    downsample if j == 0 else None, cardinality, base_width,
                                    act_layer, attn_layer, DropPath(dpr) if dpr > 0 else None))
                inplanes = planes * block.expansion
                block_idx += 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = inplanes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.pretrained_cfg = {"architecture": "timm-like", "num_classes": num_classes}
        for m in self.modules():  # non-trivial BatchNorm affine parameters and statistics
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def forward_features(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# timm's architectures (timm/models/resnet.py) at tiny widths and full depths.
ARCHS = {
    "resnet18": dict(block=BasicBlock, layers=[2, 2, 2, 2]),
    "resnet34": dict(block=BasicBlock, layers=[3, 4, 6, 3]),
    "resnet18d": dict(block=BasicBlock, layers=[2, 2, 2, 2], stem_type="deep", avg_down=True),
    "resnet50": dict(block=Bottleneck, layers=[3, 4, 6, 3]),
    "resnet50d": dict(block=Bottleneck, layers=[3, 4, 6, 3], stem_type="deep", avg_down=True),
    "resnet26t": dict(block=Bottleneck, layers=[2, 2, 2, 2], stem_width=8,
                      stem_type="deep_tiered", avg_down=True),
    "seresnet50": dict(block=Bottleneck, layers=[3, 4, 6, 3], attn_layer=SEModule),
    "ecaresnet50d": dict(block=Bottleneck, layers=[3, 4, 6, 3], stem_type="deep",
                         avg_down=True, attn_layer=EcaModule),
    "resnext50_32x4d": dict(block=Bottleneck, layers=[3, 4, 6, 3], channels=(8, 8, 16, 16),
                            cardinality=4, base_width=32),
    "wide_resnet50_2": dict(block=Bottleneck, layers=[3, 4, 6, 3], base_width=128),
}


def timm_resnet(arch, seed=1, **kwargs):
    # The seed: at 16x16 input the last stages are 1x1, where a training BatchNorm over the
    # batch of 2 can be ill-conditioned (two nearly equal values): seed 1 avoids that for
    # every architecture here, so float64 parity is a 1e-9 check of the fusion alone.
    torch.manual_seed(seed)
    return ResNet(**{**ARCHS[arch], **kwargs})


def tiny_resnet26t():
    """For ``verify --model test_fx_convert:tiny_resnet26t``."""
    return timm_resnet("resnet26t", layers=[1, 1, 1, 1])


class VGG(nn.Sequential):
    """Not a plain nn.Sequential (its own class): a unit of its parent, not of itself."""


def vgg_stack(act_layer=nn.ReLU, widths=(3, 8, 8, 16, 16)):
    """A VGG-style plain ``nn.Sequential(conv, bn, act, ...)`` with a pooling and a head."""
    torch.manual_seed(0)
    layers = []
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=i % 2 == 1), nn.BatchNorm2d(cout),
                   act_layer(inplace=True)]
        if i == 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(widths[-1], NUM_CLASSES)]
    return nn.Sequential(*layers)


class FunctionalBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = torch.relu(self.bn2(self.conv2(x)) + x)
        return (self.bn3(self.conv3(y)) + y.mean((2, 3), keepdim=True)).relu()


def functional_net():
    torch.manual_seed(0)
    return nn.Sequential(FunctionalBody(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(8, NUM_CLASSES))


# ------------------------------------------------------------------------------- helpers


def convert_and_notes(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model, **kwargs)
    notes = [str(w.message) for w in caught if issubclass(w.category, ConvertWarning)]
    return model, notes


def fused_share(model, x, train):
    """(fused, total): the BatchNorm modules of ``model`` that ran inside a fused op."""
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    state = copy.deepcopy(model.state_dict())
    model.train(train)
    with torch.no_grad(), eager_batch_norms(model) as eager:
        model(x)
    model.load_state_dict(state)
    return total - len(eager), total


def float64_step(model, x, target):
    """Loss, every gradient and every buffer after one float64 training step."""
    model.double().train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.double()), target)
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    out.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def assert_same_step(fused, eager, x, target, rel=1e-9):
    f, e = float64_step(fused, x, target), float64_step(eager, x, target)
    assert f.keys() == e.keys()
    bad = []
    for name, r in e.items():
        err = (f[name].double() - r.double()).abs().max().item()
        # relative to the tensor's largest value; at least 1e-6 for gradients that are zero
        # but for rounding (a conv bias before a BatchNorm)
        if not err <= rel * max(r.double().abs().max().item(), 1e-6):
            bad.append(f"{name}: {err:.3g} (max {r.double().abs().max().item():.3g})")
    assert not bad, "\n".join(bad)


def plans(model):
    return {n: vars(m)["forward"] for n, m in model.named_modules()
            if isinstance(vars(m).get("forward"), graph_plan.FusedForward)}


# ------------------------------------------------------------------------------- timm's ResNets


@pytest.mark.parametrize("arch", list(ARCHS))
def test_timm_resnet_fused_share_and_parity(arch):
    """Every BatchNorm but the model-level ``bn1`` (run by the model's own forward_features)
    runs inside a fused op, in eval and training; a float64 training step equals the
    unconverted model's; float32 eval is within the tolerance policy."""
    model = timm_resnet(arch)
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert type(model) is ResNet
    x, target = make_input(size=16)
    for train in (False, True):
        fused, total = fused_share(model, x, train)
        assert fused == total - 1 and fused / total >= 0.9, (arch, train, fused, total)
    assert "<model> (ResNet): bn1 not fused: ResNet's own forward runs it" in notes[0]
    blocks = [n for n in plans(model) if n.startswith("layer")]
    assert len(blocks) == sum(ARCHS[arch]["layers"])
    assert_same_step(copy.deepcopy(model), copy.deepcopy(eager), x, target)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)


def test_block_plans_defer_and_end_with_the_dual_block_end():
    model = timm_resnet("resnet50d", layers=[1, 1, 1, 1])
    convert_and_notes(model)
    text = repr(plans(model)["layer2.0"])
    assert "conv_bn_act conv1 + bn1 + act1 (deferred)" in text
    assert "conv_bn_act conv2 + bn2 + act2 (deferred)" in text  # through drop_block and aa
    assert "block_end conv3 + bn3 + downsample.2(downsample.1) + act3" in text  # after the pool
    stem = repr(plans(model)["conv1"])  # the deep stem: two pairs, the last conv is alone
    assert stem.count("conv_bn_act") == 2 and "1 + 2 (deferred)" in stem


def test_timm_model_keeps_class_methods_state_and_optimizer():
    model = timm_resnet("resnet18d", layers=[1, 1, 1, 1])
    eager = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    convert_and_notes(model)
    assert type(model) is ResNet and type(model.layer1[0]) is BasicBlock
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    assert model.pretrained_cfg["architecture"] == "timm-like"
    x, target = make_input(size=16)
    model.eval()
    eager.eval()
    features = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(features), eager(x), rtol=1e-5, atol=1e-5)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(NUM_CLASSES)
    model.fc.load_state_dict(eager.fc.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.layer2[0].conv1.weight.detach().clone()
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model(x), target).backward()
    optimizer.step()
    assert not torch.equal(before, model.layer2[0].conv1.weight)


def test_state_dict_deepcopy_and_pickle():
    model = timm_resnet("resnet26t", layers=[1, 1, 1, 1])
    convert_and_notes(model)
    x, target = make_input(size=16)
    model.train()
    F.cross_entropy(model(x), target).backward()  # running statistics move
    model.eval()
    expected = model(x)
    fresh = timm_resnet("resnet26t", layers=[1, 1, 1, 1], seed=2)
    fresh.load_state_dict(model.state_dict())
    assert model.state_dict().keys() == fresh.state_dict().keys()
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is ResNet
        for name, forward in plans(clone).items():
            assert forward.module is clone.get_submodule(name)  # its own modules
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        with eager_batch_norms(clone) as eager:
            clone(x)
        assert eager == {"bn1"}
        clone.layer1[0].bn1.weight.data.add_(1)  # the clone's parameters, not the model's
        assert not torch.equal(clone(x), expected)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_train_eval_switching_and_frozen_batch_norm():
    """A model converted in eval trains with batch statistics; a BatchNorm left in eval inside
    a training model uses its running statistics."""
    model = timm_resnet("resnet50", layers=[1, 1, 1, 1]).eval()
    eager = copy.deepcopy(model)
    convert_and_notes(model)
    x, target = make_input(size=16)
    for m in (model, eager):
        m.train()
        m.layer2[0].bn2.eval()
        m.layer3[0].downsample[1].eval()
    f, e = float64_step(model, x, target), float64_step(eager, x, target)
    for name in ("loss", "grad layer2.0.conv1.weight", "buffer layer2.0.bn2.running_mean",
                 "buffer layer3.0.downsample.1.running_var", "buffer layer1.0.bn1.running_mean"):
        torch.testing.assert_close(f[name], e[name], rtol=1e-9, atol=1e-12)
    assert torch.equal(f["buffer layer2.0.bn2.num_batches_tracked"],
                       e["buffer layer2.0.bn2.num_batches_tracked"])


def test_memory_efficient_backend_and_converting_again():
    model = timm_resnet("resnet18d", layers=[1, 1, 1, 1])
    eager = copy.deepcopy(model)
    _, first = convert_and_notes(model)
    _, again = convert_and_notes(model, backend="reference", memory_efficient=True)
    assert again == first  # re-planned, reported the same
    forwards = plans(model)
    assert forwards and all(f.backend == "reference" and f.memory_efficient
                            for f in forwards.values())
    convert_and_notes(model, memory_efficient=True)
    x, target = make_input(size=16)
    assert_same_step(model, eager, x, target)


# ------------------------------------------------------------------------------- partial matches


def test_squeeze_excitation_leaves_the_add_unfused_and_is_reported():
    model = timm_resnet("seresnet50", layers=[1, 2, 1, 1])
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert "layer2.1 (Bottleneck): the add after bn3 is not fused: se (SEModule) runs between " \
           "them" in notes[0]
    text = repr(plans(model)["layer2.1"])
    assert "conv_bn_act conv3 + bn3;" in text or text.endswith("conv_bn_act conv3 + bn3)")
    assert "block_end" not in text
    with pytest.raises(ValueError, match=r"layer2\.1 \(Bottleneck\): the add after bn3"):
        convert(copy.deepcopy(eager), strict=True)
    fresh = copy.deepcopy(eager)
    with pytest.raises(ValueError, match="nothing changed"):
        convert(fresh, strict=True)
    assert not plans(fresh)  # strict=True changed nothing
    x, target = make_input(size=16)
    assert_same_step(model, eager, x, target)


def test_drop_path_is_not_fused_through_in_training_nor_in_eval():
    model = timm_resnet("resnet50", layers=[1, 2, 1, 1], drop_path_rate=0.5)
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert "layer2.1 (Bottleneck): the add after bn3 is not fused: drop_path (DropPath) runs " \
           "between them" in notes[0]
    x, target = make_input(size=16)
    torch.manual_seed(1)
    f = float64_step(model, x, target)
    torch.manual_seed(1)
    e = float64_step(eager, x, target)
    torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-12)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)


def test_silu_runs_eagerly_after_fused_conv_and_batch_norm():
    model = timm_resnet("resnet18", layers=[1, 1, 1, 1], act_layer=nn.SiLU)
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert "layer1.0 (BasicBlock): act1 (SiLU) runs eagerly after the fused conv1 + bn1" in notes[0]
    assert "act2 (SiLU) runs eagerly after the fused conv2 + bn2 + add" in notes[0]
    x, target = make_input(size=16)
    fused, total = fused_share(model, x, train=True)
    assert fused == total - 1
    assert_same_step(model, eager, x, target)


def test_vgg_sequential_model():
    model = vgg_stack()  # a plain Sequential model is rewritten itself
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert not notes
    assert type(model) is nn.Sequential and "(deferred)" in repr(plans(model)[""])
    x, target = make_input(size=16)
    for train in (False, True):
        assert fused_share(model, x, train) == (4, 4)
    assert_same_step(model, eager, x, target)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)


def test_vgg_with_silu_and_a_sequential_subclass():
    model = nn.Sequential(VGG(*vgg_stack(nn.SiLU)))
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert "0 (VGG): 2 (SiLU) runs eagerly after the fused 0 + 1" in notes[0]
    x, target = make_input(size=16)
    assert fused_share(model, x, True) == (4, 4)
    assert_same_step(model, eager, x, target)


def test_functional_relu_and_a_broadcasting_add():
    model = functional_net()
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    assert not notes
    text = repr(plans(model)["0"])
    assert "conv_bn_act conv1 + bn1 + relu;" in text  # not deferred: the add uses it too
    assert "block_end conv2 + bn2 + shortcut + relu" in text
    assert "block_end conv3 + bn3 + shortcut + relu" in text  # its add broadcasts: eager
    x, target = make_input(size=16)
    assert_same_step(model, eager, x, target)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)


class HookedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):  # its own forward: not a plain BatchNorm2d
        return super().forward(x)


def test_modules_that_cannot_fuse_run_eagerly_and_are_reported():
    model = timm_resnet("resnet18", layers=[1, 1, 1, 1])
    model.layer1[0].conv1.register_forward_hook(lambda *a: None)
    model.layer2[0].bn2 = HookedBatchNorm(model.layer2[0].bn2.num_features)
    model.layer1[0].conv2.padding_mode = "reflect"
    eager = copy.deepcopy(model)
    _, notes = convert_and_notes(model)
    for expected in ("layer1.0 (BasicBlock): bn1 not fused: conv1 is not a plain zero-padded",
                     "layer2.0 (BasicBlock): bn2 not fused: it is not a plain nn.BatchNorm2d "
                     "without hooks (HookedBatchNorm)",
                     "layer1.0 (BasicBlock): bn2 not fused: conv2 is not a plain"):
        assert expected in notes[0]
    x, target = make_input(size=16)
    state = copy.deepcopy(model.state_dict())
    with eager_batch_norms(model) as unfused:
        model.train()(x)
    model.load_state_dict(state)
    assert unfused == {"bn1", "layer1.0.bn1", "layer2.0.bn2", "layer1.0.bn2"}
    assert_same_step(model, eager, x, target)


def test_untraceable_and_mode_dependent_units_are_left_as_they_are():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    class ModeDependent(DataDependent):
        def forward(self, x):
            y = self.bn(self.conv(x))
            return F.dropout(y, 0.5) if self.training else y

    model = nn.Sequential(DataDependent(), ModeDependent())
    _, notes = convert_and_notes(model)
    assert "0 (DataDependent): bn not fused: torch.fx cannot trace its forward" in notes[0]
    assert "1 (ModeDependent): bn not fused: its forward traces differently in training and in " \
           "eval" in notes[0]
    assert not plans(model)


# ------------------------------------------------------------------------------- bugs are caught


def test_the_parity_checks_catch_a_wrong_residual_and_a_relu_for_silu():
    """The float64 comparison used above fails on a plan that adds the residual from the wrong
    tensor, and on one that fuses a ReLU where the model has a SiLU."""
    model = timm_resnet("resnet18", layers=[1, 1, 1, 1])
    eager = copy.deepcopy(model)
    convert_and_notes(model)
    x, target = make_input(size=16)
    check_policy(model, eager, x, target, torch.float32, train=False, backward=False)
    forward = plans(model)["layer1.0"]
    forward.steps = tuple(dataclasses.replace(s, shortcut=graph_plan.Ref(1))
                          if isinstance(s, graph_plan.FusedBlockEnd) else s
                          for s in forward.steps)  # value 1: act1's output, not the input
    with pytest.raises(AssertionError, match="logits"):
        check_policy(model, eager, x, target, torch.float32, train=False, backward=False)

    model = timm_resnet("resnet18", layers=[1, 1, 1, 1], act_layer=nn.SiLU)
    eager = copy.deepcopy(model)
    convert_and_notes(model)
    forward = plans(model)["layer1.0"]
    forward.steps = tuple(dataclasses.replace(s, functional_relu=True)
                          if isinstance(s, graph_plan.FusedConv) else s
                          for s in forward.steps)
    with pytest.raises(AssertionError):
        assert_same_step(model, eager, x, target)


# ------------------------------------------------------------------------------- compile


def test_compile_fullgraph_training_step():
    model = timm_resnet("resnet18d", layers=[1, 1, 1, 1])
    eager = copy.deepcopy(model)
    convert_and_notes(model)
    x, target = make_input(size=16)
    compiled = torch.compile(model, fullgraph=True)
    loss = F.cross_entropy(compiled(x), target)
    loss.backward()
    expected = F.cross_entropy(eager(x), target)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layer2[0].conv1.weight.grad,
                               eager.layer2[0].conv1.weight.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.layer2[0].bn2.running_var,
                               eager.layer2[0].bn2.running_var, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- command line


def test_verify_model_command(capsys, tmp_path):
    out = tmp_path / "rows.json"
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        code = cli_main(["verify", "--model", "test_fx_convert:tiny_resnet26t", "--input",
                         "2x3x16x16", "--backend", "cpu", "--dtypes", "float64", "--json",
                         str(out)])
    finally:
        sys.path.remove(str(Path(__file__).parent))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "BatchNorm layers inside fused ops: 17/18 in eval, 17/18 in training" in stdout
    for quantity in ("layer2.0 (eval)", "layer2.0 (train)", "logits (eval)", "loss (train)",
                     "gradients (56, worst:", "running statistics (54, worst:"):
        assert quantity in stdout
    assert stdout.splitlines()[-1] == "14 passed, 0 failed"
    assert "bn1 not fused" in stdout


def not_a_module():
    return torch.zeros(1)


@pytest.mark.parametrize("args,expected", [
    (["--model", "no_such_module_here:build"], "cannot import 'no_such_module_here'"),
    (["--model", "test_fx_convert:not_a_module"], "returned a Tensor, not a torch.nn.Module"),
    (["--model", "test_fx_convert:tiny_resnet26t", "--input", "2x3x16"], "has rank 3"),
    (["--model", "resnet19"], "invalid choice: 'resnet19'"),
], ids=["not_importable", "not_a_module", "wrong_rank", "unknown_builtin"])
def test_verify_model_bad_input_is_one_line_and_exit_2(capsys, args, expected):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        code = cli_main(["verify", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    finally:
        sys.path.remove(str(Path(__file__).parent))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
