"""Test set-up: without a GPU, Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles (decorates) any kernel, so it is set here,
before resnet_fast is imported by any test module.

Measured dispatch (resnet_fast.dispatch) is off in the tests (RESNET_FAST_AUTOTUNE=0): a call
with the default backend runs the device's default fused backend, so the tests check what they
name; tests/test_dispatch.py turns it on with injected timers. Its cache directory is a fresh
temporary one, so no test reads or writes the user's cache.

Fixtures: ``device``, the device the tests run on (CUDA where torch has it, else the CPU), and
``backend``, every resnet_fast backend but ``reference`` (the ground truth the others are compared
with), one parametrisation each. A backend that cannot run on ``device`` is a recorded skip that
gives ``resnet_fast.unavailable_reason``; tests parametrise ``backend`` themselves (indirectly) to
run a subset. The tests of the Triton kernels themselves (tests/test_triton_*.py) take
``triton_device``, ``within_policy`` and ``aot_reports``.
"""

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RESNET_FAST_AUTOTUNE"] = "0"
os.environ["RESNET_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_fast_cache_")

import resnet_fast  # noqa: E402  (after TRITON_INTERPRET is set)
from resnet_fast import verify  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = tuple(b for b in resnet_fast.BACKENDS if b != "reference")

# Property tests (tests/test_properties.py): "bounded" runs in `make test`, the same cases on
# every run; "long" (`--hypothesis-profile=long`) draws many more, at random.
settings.register_profile("bounded", max_examples=150, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bounded")


def require_backend(name: str, device=DEVICE) -> None:
    """Skips the calling test, saying why, when backend ``name`` cannot run on ``device``."""
    reason = resnet_fast.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend {name} cannot run on {torch.device(device)}: {reason}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request, device) -> str:
    """A fused backend's name; skipped where it cannot run on ``device``."""
    require_backend(request.param, device)
    return request.param


@pytest.fixture
def interpreted(backend, device) -> bool:
    """Whether ``backend`` runs under Triton's interpreter here (Python per program: slow, so
    such tests take their smallest shapes)."""
    return backend == "triton" and device.type == "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models: on a machine shared with other jobs the
    idle threads of a second one spin and slow every op down (measured: 5 min -> 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """The device Triton kernels run on when a test calls them directly: the CPU under Triton's
    interpreter (TRITON_INTERPRET=1, set above where torch has no CUDA), else CUDA; skipped
    where there is neither."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU, or TRITON_INTERPRET=1 set before Triton is "
                    "imported")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def within_policy():
    """``check(runs, dtype)``: fails the test unless a kernel's quantities are within the
    tolerance policy (:func:`resnet_fast.verify.compare_redrawn`, activations in ``dtype``) on
    the case ``runs(seed)`` draws as ``(reference, eager, fused)``, quantities by name."""

    def check(runs, dtype):
        failures = verify.describe_failures(*verify.compare_redrawn(runs, dtype))
        assert not failures, "\n".join(failures)

    return check


@pytest.fixture(scope="module")
def aot_reports(request):
    """{arch: report} for every arch in the requesting module's ARCHS: the module's
    ``aot_report(arch)``, computed by the module run as a script once per arch, all at once
    (tests/_triton_aot.py); skipped where there is no cuobjdump to read the cubins."""
    from _triton_aot import _cuobjdump, aot_reports_of

    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (Triton bundles it)")
    return aot_reports_of(request.module.__file__, request.module.ARCHS)
