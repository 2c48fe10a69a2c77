"""resnet_fast: fused conv / BatchNorm / residual-add / ReLU kernels for ResNets, checked against
eager, and a drop-in torchvision-style ResNet family built on them (:mod:`resnet_fast.models`,
:func:`convert`).

The compiled extension ``resnet_fast._C`` defines the ops and holds the CPU kernels: without it
``import resnet_fast`` fails with an ``ImportError`` that says how to build it. A backend that
cannot run says why (:func:`available_backends`, :func:`unavailable_reason`).
"""

from resnet_fast import ops  # noqa: F401  (registers the resnet_fast:: ops)
from resnet_fast.backends import BACKENDS, available_backends, unavailable_reason
from resnet_fast.convert import ConvertWarning, convert
from resnet_fast.dispatch import explain, tune
from resnet_fast.functional import (
    DeferredBatchNorm,
    batch_norm_add_relu,
    batch_norm_relu,
    conv_bn_relu,
    dual_batch_norm_add_relu,
)
from resnet_fast.sync_batchnorm import SyncBatchNorm, SyncBatchNormWarning, \
    convert_sync_batchnorm
from resnet_fast.models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

from resnet_fast._version import __version__  # noqa: E402

__all__ = [
    "BACKENDS",
    "available_backends",
    "unavailable_reason",
    "batch_norm_relu",
    "batch_norm_add_relu",
    "dual_batch_norm_add_relu",
    "conv_bn_relu",
    "DeferredBatchNorm",
    "convert",
    "ConvertWarning",
    "tune",
    "explain",
    "SyncBatchNorm",
    "SyncBatchNormWarning",
    "convert_sync_batchnorm",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
