"""resnet_fast.SyncBatchNorm across 2 gloo processes against one process on the whole batch.

The distributed checks run in one spawn of 2 processes for the whole module (loopback address,
a free port, bounded timeouts on the process group and on the join); each rank writes what it
measured to a file and the tests compare here:

* a DDP training step of a fused ResNet with synchronised BatchNorms, each rank on its share
  of the global batch (uneven: 3 and 5 samples; 4 and 4 once), against one process on the whole
  batch with plain ``nn.BatchNorm2d`` (the eager reference model): the loss, every gradient,
  every running statistic and ``num_batches_tracked``, within 1e-9 relative in float64 and
  under the tolerance policy (:func:`resnet_fast.verify.compare`) in float32; a BasicBlock
  ResNet built with ``norm_layer=nn.SyncBatchNorm`` or converted with
  ``rf.convert_sync_batchnorm``, a Bottleneck ResNet converted from ``nn.SyncBatchNorm`` by
  ``rf.convert``; then eval, which must match and run no collective;
* the collectives each step issues, counted by wrapping torch.distributed's functions: one
  all-gather per synchronised BatchNorm in forward and one all_reduce per BatchNorm in backward,
  nothing else;
* one layer: ``momentum=None`` over two steps, a rank with an empty share of the batch, a
  process group of one process (local statistics, no collective), the eager reference
  :func:`resnet_fast.reference.sync_batch_norm`, and ``torch.compile(fullgraph=True)`` of a
  layer (``aot_eager``: dynamo and AOT autograd, no code generation).

Then, in this process (no process group): training warns once and uses local statistics, eval
does not warn, bad arguments, and the entry points' structure.
"""

from __future__ import annotations

import datetime
import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import resnet_fast as rf
from resnet_fast import models, reference, reference_models, sync_batchnorm
from resnet_fast.cli.train_dist import free_port
from resnet_fast.verify import compare

from test_models import randomize_batch_norms

WORLD = 2
NUM_CLASSES = 5
SIZE = 8  # input 8x8 with the CIFAR stem: layer4 is 1x1, still 3+ values per channel per rank
JOIN_TIMEOUT_S = 240
# The distributed model cases: (name, block, how its BatchNorms become synchronised, dtype,
# per-rank batch sizes).
CASES = [
    ("basic_float64", "basic", "norm_layer", torch.float64, (3, 5)),
    ("bottleneck_float64", "bottleneck", "convert", torch.float64, (3, 5)),
    ("basic_float32", "basic", "convert_sync_batchnorm", torch.float32, (3, 5)),
    ("basic_float32_even", "basic", "norm_layer", torch.float32, (4, 4)),
    ("bottleneck_float32", "bottleneck", "convert", torch.float32, (3, 5)),
]
pytestmark = pytest.mark.usefixtures("one_thread")

_COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "all_reduce",
                "broadcast", "reduce", "reduce_scatter_tensor", "all_to_all_single", "gather",
                "scatter", "all_reduce_coalesced", "barrier")


def _eager_model(block: str) -> nn.Module:
    blk = {"basic": reference_models.BasicBlock, "bottleneck": reference_models.Bottleneck}[block]
    return reference_models.ResNet(blk, [1, 1, 1, 1], num_classes=NUM_CLASSES, small_input=True)


def _sync_model(block: str, how: str) -> nn.Module:
    """A fused ResNet whose BatchNorms are synchronised, made through one entry point."""
    if how == "norm_layer":
        blk = {"basic": models.BasicBlock, "bottleneck": models.Bottleneck}[block]
        return models.ResNet(blk, [1, 1, 1, 1], num_classes=NUM_CLASSES, small_input=True,
                             norm_layer=nn.SyncBatchNorm)
    if how == "convert_sync_batchnorm":
        blk = {"basic": models.BasicBlock, "bottleneck": models.Bottleneck}[block]
        return rf.convert_sync_batchnorm(
            models.ResNet(blk, [1, 1, 1, 1], num_classes=NUM_CLASSES, small_input=True))
    return rf.convert(nn.SyncBatchNorm.convert_sync_batchnorm(_eager_model(block)))


def _data(dtype: torch.dtype, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def _state(block: str, dtype: torch.dtype, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = randomize_batch_norms(_eager_model(block))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in
            model.state_dict().items()}


def _step(model: nn.Module, x, target, total: int) -> torch.Tensor:
    """One training step's backward of ``sum(loss) / total``; returns the loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).double(), target, reduction="sum") / total
    loss.backward()
    return loss.detach()


def _results(module: nn.Module, loss: torch.Tensor) -> dict:
    out = {"loss": loss}
    out.update({"grad:" + n: p.grad.detach().clone() for n, p in module.named_parameters()})
    out.update({"buffer:" + n: b.detach().clone() for n, b in module.named_buffers()})
    return out


class _Counter:
    """Counts the calls of torch.distributed's collectives while installed."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self._saved = {}

    def __enter__(self):
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def total(self) -> int:
        return sum(self.calls.values())


def _share(rank: int, split: tuple[int, ...]) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _model_cases(rank: int, out: dict) -> None:
    for name, block, how, dtype, split in CASES:
        total = sum(split)
        x, target = _data(dtype, total)
        model = _sync_model(block, how).to(dtype)
        model.load_state_dict(_state(block, dtype))
        layers = sum(isinstance(m, rf.SyncBatchNorm) for m in model.modules())
        ddp = nn.parallel.DistributedDataParallel(model)
        share = _share(rank, split)
        model.train()
        model.zero_grad(set_to_none=True)
        with _Counter() as fwd:
            loss = F.cross_entropy(ddp(x[share]).double(), target[share], reduction="sum")
            loss = loss / total
        with _Counter() as bwd:
            (loss * WORLD).backward()  # DDP averages: the gradient of the global mean loss
        result = _results(model, loss.detach())
        model.eval()
        with _Counter() as ev, torch.no_grad():
            result["eval_logits"] = ddp(x).detach()
        out[name] = {"results": result, "layers": layers, "forward": fwd.calls,
                     "backward": bwd.calls, "eval": ev.calls}


def _layer_cases(rank: int, out: dict) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 3
    r = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)

    def run(layer, data, residual=None, relu=False, steps=1, grad=True):
        xs = data.clone().requires_grad_(grad)
        for _ in range(steps):
            y = layer.bn_act(xs, residual, relu=relu) if isinstance(layer, rf.SyncBatchNorm) \
                else layer(xs)
        if grad:
            y.backward(dy[:len(data)])
        return y.detach(), (xs.grad if grad else None)

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if b.numel() else 0

    errors = {}
    # momentum=None over two steps, uneven shares (2 and 6).
    sync = rf.SyncBatchNorm(4, momentum=None).double()
    plain = nn.BatchNorm2d(4, momentum=None).double()
    share = _share(rank, (2, 6))
    run(sync, x[share], steps=2, grad=False)
    run(plain, x, steps=2, grad=False)
    errors["cma_running_mean"] = relative(sync.running_mean, plain.running_mean)
    errors["cma_running_var"] = relative(sync.running_var, plain.running_var)
    errors["cma_count"] = int(sync.num_batches_tracked != plain.num_batches_tracked)
    # An empty share on rank 1: rank 0's data is the whole batch.
    sync, plain = rf.SyncBatchNorm(4).double(), nn.BatchNorm2d(4).double()
    share = slice(0, 6) if rank == 0 else slice(6, 6)
    y, dx = run(sync, x[share])
    y_ref, dx_ref = run(plain, x[:6])
    errors["empty_output"] = relative(y, y_ref[share])
    errors["empty_grad"] = relative(dx, dx_ref[share])
    errors["empty_running_var"] = relative(sync.running_var, plain.running_var)
    # A process group of one process: this rank's statistics, no collective.
    groups = [dist.new_group([i]) for i in range(WORLD)]
    sync, plain = rf.SyncBatchNorm(4, process_group=groups[rank]).double(), \
        nn.BatchNorm2d(4).double()
    with _Counter() as single:
        y, dx = run(sync, x[_share(rank, (4, 4))])
    y_ref, dx_ref = run(plain, x[_share(rank, (4, 4))])
    errors["single_output"] = relative(y, y_ref)
    errors["single_grad"] = relative(dx, dx_ref)
    out["single_collectives"] = single.total()
    # The eager reference, and the fused layer with the same residual and ReLU, uneven shares.
    share = _share(rank, (3, 5))
    plain = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5, generator=g)
        plain.bias.uniform_(-0.5, 0.5, generator=g)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y_ref = torch.relu(plain(xs) + rs)
    y_ref.backward(dy)
    for kind in ("reference", "fused"):
        sync = rf.SyncBatchNorm(4).double()
        with torch.no_grad():
            sync.weight.copy_(plain.weight)
            sync.bias.copy_(plain.bias)
        xl, rl = x[share].clone().requires_grad_(), r[share].clone().requires_grad_()
        if kind == "reference":
            y = reference.sync_batch_norm(xl, sync.running_mean, sync.running_var, sync.weight,
                                          sync.bias, residual=rl, relu=True,
                                          num_batches_tracked=sync.num_batches_tracked)
        else:
            y = sync.bn_act(xl, rl, relu=True)
        y.backward(dy[share])
        grad_weight = sync.weight.grad.clone()
        dist.all_reduce(grad_weight)  # the local sums add up to the whole batch's gradient
        errors[f"{kind}_output"] = relative(y, y_ref[share])
        errors[f"{kind}_grad_input"] = relative(xl.grad, xs.grad[share])
        errors[f"{kind}_grad_residual"] = relative(rl.grad, rs.grad[share])
        errors[f"{kind}_grad_weight"] = relative(grad_weight, plain.weight.grad)
        errors[f"{kind}_running_var"] = relative(sync.running_var, plain.running_var)
    # torch.compile (dynamo + AOT autograd, without code generation): one graph, same values.
    compiled_layer, eager_layer = rf.SyncBatchNorm(4).double(), rf.SyncBatchNorm(4).double()
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    y, dx = run(compiled, x[share])
    y_ref, dx_ref = run(eager_layer, x[share])
    errors["compile_output"] = relative(y, y_ref)
    errors["compile_grad"] = relative(dx, dx_ref)
    errors["compile_running_var"] = relative(compiled_layer.running_var, eager_layer.running_var)
    out["layer_errors"] = errors


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        out: dict = {}
        _model_cases(rank, out)
        _layer_cases(rank, out)
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """What each rank measured (a list by rank), from one spawn of 2 gloo processes."""
    path = tmp_path_factory.mktemp("sync_bn")
    context = mp.spawn(_worker, args=(free_port(), str(path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:  # join() also returns False when one process is done and another is not
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} processes did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(block: str, dtype: torch.dtype, split) -> dict:
    """The eager model with plain nn.BatchNorm2d on the whole batch, in ``dtype``."""
    model = _eager_model(block).to(dtype)
    model.load_state_dict(_state(block, dtype))
    x, target = _data(dtype, sum(split))
    result = _results(model, _step(model, x, target, sum(split)))
    model.eval()
    with torch.no_grad():
        result["eval_logits"] = model(x)
    return result


def _distributed_results(ranks: list, name: str) -> dict:
    """The whole batch's quantities from the ranks: the loss summed, the gradients (averaged
    by DDP) and buffers of rank 0, which must equal rank 1's exactly."""
    first, second = (r[name]["results"] for r in ranks)
    for key in first:
        if key != "loss":
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs between ranks"
    return dict(first, loss=first["loss"] + second["loss"])


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[3] == torch.float64])
def test_ddp_step_float64_equals_single_process(distributed, name):
    _, block, _, dtype, split = next(c for c in CASES if c[0] == name)
    fused = _distributed_results(distributed, name)
    ref = _single_process(block, dtype, split)
    assert fused.keys() == ref.keys()
    bad = []
    for key, r in ref.items():
        f = fused[key]
        if not r.is_floating_point():
            if not torch.equal(f, r):
                bad.append(f"{key}: {f} != {r}")
            continue
        err = (f - r).abs().max().item() / max(r.abs().max().item(), 1e-300)
        if not err <= 1e-9:
            bad.append(f"{key}: relative error {err:.3g}")
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[3] == torch.float32])
def test_ddp_step_float32_under_tolerance_policy(distributed, name):
    _, block, _, dtype, split = next(c for c in CASES if c[0] == name)
    fused = _distributed_results(distributed, name)
    eager = _single_process(block, torch.float32, split)
    # The float64 reference from the same (float32-rounded) weights and inputs.
    model = _eager_model(block).double()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v
                           for k, v in _state(block, torch.float32).items()})
    x, target = _data(torch.float32, sum(split))
    ref = _results(model, _step(model, x.double(), target, sum(split)))
    model.eval()
    with torch.no_grad():
        ref["eval_logits"] = model(x.double())
    errors, eager_errors, bounds = compare(ref, eager, fused, torch.float32)
    bad = [f"{k}: {errors[k]:.3g} > {bounds[k]:.3g} (eager {eager_errors[k]:.3g})"
           for k in errors if not errors[k] <= bounds[k]]
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_one_collective_per_layer_each_way(distributed, name):
    for rank, measured in enumerate(distributed):
        m = measured[name]
        gathers = m["forward"].get("all_gather_single", 0) + m["forward"].get(
            "all_gather_into_tensor", 0)
        assert gathers == m["layers"] and sum(m["forward"].values()) == m["layers"], (
            f"rank {rank}: forward collectives {m['forward']} for {m['layers']} layers")
        assert m["backward"] == {"all_reduce": m["layers"]}, (
            f"rank {rank}: backward collectives {m['backward']} for {m['layers']} layers")
        assert m["eval"] == {}, f"rank {rank}: eval ran collectives {m['eval']}"


def test_layer_corners(distributed):
    for rank, measured in enumerate(distributed):
        errors = measured["layer_errors"]
        bad = {k: v for k, v in errors.items() if not v <= 1e-9}
        assert not bad, f"rank {rank}: {bad}"
        assert measured["single_collectives"] == 0


# ------------------------------------------------------------- this process: no process group


def _pair(momentum=0.1):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=momentum).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    sync = rf.SyncBatchNorm(4, momentum=momentum).double()
    sync.load_state_dict(plain.state_dict())
    return sync, plain


def test_training_without_process_group_warns_once_and_is_local():
    assert not dist.is_initialized()
    sync, plain = _pair()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    sync_batchnorm._warn_unsynchronised.cache_clear()
    with pytest.warns(rf.SyncBatchNormWarning, match="without an initialised process group"):
        y = sync(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rf.SyncBatchNormWarning)
        y2 = sync(x)
    y_ref, y2_ref = plain(x), plain(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2, y2_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=1e-12, atol=1e-12)
    assert sync.num_batches_tracked.item() == plain.num_batches_tracked.item() == 2


def test_eval_is_local_and_silent():
    sync, plain = _pair()
    sync.eval(), plain.eval()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    sync_batchnorm._warn_unsynchronised.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", rf.SyncBatchNormWarning)
        y = sync.bn_act(x, x, relu=True)
    torch.testing.assert_close(y, torch.relu(plain(x) + x), rtol=1e-12, atol=1e-12)


def test_bad_input():
    sync = rf.SyncBatchNorm(4)
    with pytest.raises(TypeError, match="expects a Tensor"):
        sync("x")
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 4, \.\.\.\)"):
        sync(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sync(torch.randn(4))
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        sync.eval().bn_act(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got str"):
        rf.convert_sync_batchnorm("model")
    with pytest.raises(TypeError, match="process_group must be None or a"):
        rf.convert_sync_batchnorm(nn.BatchNorm2d(4), process_group="group")
    # Not a BatchNorm: left alone, with a warning when there is none at all.
    with pytest.warns(rf.SyncBatchNormWarning, match="found no BatchNorm"):
        assert type(rf.convert_sync_batchnorm(nn.GroupNorm(2, 4))) is nn.GroupNorm


def test_entry_points_keep_structure():
    with torch.device("meta"):
        sync = rf.resnet50(norm_layer=nn.SyncBatchNorm)
        plain = rf.resnet50()
    assert sync.state_dict().keys() == plain.state_dict().keys()
    norms = [m for m in sync.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 53 and all(type(m) is rf.SyncBatchNorm for m in norms)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())  # DDP on CPU
    # convert() fuses a model of nn.SyncBatchNorms, keeping the objects and process_group.
    group = object()  # nn.SyncBatchNorm stores any process group it is given
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(_eager_model("bottleneck"), group)
    keys, bn = eager.state_dict().keys(), eager.layer1[0].bn2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rf.convert(eager)
    assert type(model) is models.ResNet and type(model.layer1[0]) is models.Bottleneck
    assert model.layer1[0].bn2 is bn and type(bn) is rf.SyncBatchNorm
    assert bn.process_group is group and model.state_dict().keys() == keys
    # convert_sync_batchnorm converts in place and sets the group.
    fused = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES)
    bn = fused.layer2[0].downsample[1]
    assert rf.convert_sync_batchnorm(fused) is fused and type(bn) is rf.SyncBatchNorm
    assert bn.process_group is None and math.isclose(bn.momentum, 0.1)
