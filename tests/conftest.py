"""Test set-up: without a GPU, Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles (decorates) any kernel, so it is set here,
before resnet_fast is imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

