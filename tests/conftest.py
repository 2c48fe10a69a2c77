"""Test set-up: without a GPU, Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles (decorates) any kernel, so it is set here,
before resnet_fast is imported by any test module.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Property tests (tests/test_properties.py): "bounded" runs in `make test`, the same cases on
# every run; "long" (`--hypothesis-profile=long`) draws many more, at random.
settings.register_profile("bounded", max_examples=150, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bounded")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models: on a machine shared with other jobs the
    idle threads of a second one spin and slow every op down (measured: 5 min -> 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
