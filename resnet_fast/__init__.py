"""resnet_fast: fused BatchNorm / residual-add / ReLU kernels for ResNets, checked against eager.

``import resnet_fast`` works without the compiled extension; the backends that need it then say
why they are unavailable (:func:`available_backends`, :func:`unavailable_reason`).
"""

from resnet_fast import ops  # noqa: F401  (registers the resnet_fast:: ops)
from resnet_fast.backends import BACKENDS, available_backends, unavailable_reason
from resnet_fast.functional import (
    DeferredBatchNorm,
    batch_norm_add_relu,
    batch_norm_relu,
    conv_bn_relu,
    dual_batch_norm_add_relu,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "unavailable_reason",
    "batch_norm_relu",
    "batch_norm_add_relu",
    "dual_batch_norm_add_relu",
    "conv_bn_relu",
    "DeferredBatchNorm",
]
