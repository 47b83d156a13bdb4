"""Test-suite setup: poisoned kernel outputs, Triton's interpreter on CPU-only machines, the
backends that must run here (a test fails, not skips, when one that should run cannot; it skips
only for missing hardware or a missing tool), the hypothesis profiles of the property tests, and
the count of skips by reason at the end of the run."""
import os

os.environ.setdefault("MIXEDPREC_POISON_OUTPUTS", "1")  # read by the C++ glue and the Triton launchers
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton kernels are defined
except ImportError:  # pragma: no cover
    pass

import collections  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from backend_checks import CPU_HAS_AVX512  # noqa: E402
from mixedprec import _extension, ops  # noqa: E402
from mixedprec.ops import library  # noqa: E402
from mixedprec.ops.backend import NAMESPACES  # noqa: E402

KERNEL_BACKENDS = ("cpu", "simt", "triton", "cuda")
# Property tests give these fewer and smaller examples: the CUDA sources under SIMT emulation,
# and Triton's interpreter where there is no GPU. The others run at native speed.
EMULATED_BACKENDS = ("simt",) if torch.cuda.is_available() else ("simt", "triton")
NATIVE_KERNEL_BACKENDS = tuple(b for b in KERNEL_BACKENDS if b not in EMULATED_BACKENDS)

# "ci" (the default): the same examples on every run (derandomized, no example database), sized so
# that tests/test_properties.py takes half a minute on an idle 2-core machine (two on a busy one).
# HYPOTHESIS_PROFILE=long: ten times as many examples, freshly random on each run, failures
# remembered in .hypothesis/.
_PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_PROFILE)
settings.register_profile("long", max_examples=1000, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(ci_count: int) -> int:
    """A property test's example count: ``ci_count`` under the ci profile, scaled with the profile."""
    return max(1, ci_count * settings.default.max_examples // 100)


def pytest_sessionstart(session):
    if not _extension.poison_outputs():
        value = os.environ["MIXEDPREC_POISON_OUTPUTS"]
        raise pytest.UsageError(
            f"kernel outputs are not NaN-poisoned (MIXEDPREC_POISON_OUTPUTS={value!r}): "
            "the tests need it to be 1, so that an element a kernel does not write cannot pass as correct; "
            "unset it where it is set in the environment")


def pytest_terminal_summary(terminalreporter):
    """Skips counted by reason: each must name missing hardware or a missing tool."""
    reasons = collections.Counter(report.longrepr[2].removeprefix("Skipped: ")
                                  for report in terminalreporter.stats.get("skipped", [])
                                  if isinstance(report.longrepr, tuple))
    if reasons:
        terminalreporter.section("skips by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:6d}  {reason}")


# ---------------------------------------------------------------------------------------------
# which backends must run here

@functools.cache
def gpu_hardware() -> str | None:
    """An NVIDIA GPU this machine has, whatever torch sees: its device file or nvidia-smi's line."""
    if devices := sorted(glob.glob("/dev/nvidia[0-9]*")):
        return devices[0]
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
        if listed.startswith("GPU "):
            return listed.splitlines()[0]
    return None


def _missing_hardware_or_tool(backend: str) -> str | None:
    """Why ``backend`` may legitimately not run here (a skip reason), or None when it must run:
    cpu and simt wherever the package is built, cuda wherever there is a GPU and nvcc to build its
    kernels, triton wherever it is installed (under its interpreter where there is no GPU)."""
    if backend == "cuda" and not torch.cuda.is_available():
        return None if gpu_hardware() else "no GPU on this machine (backend 'cuda')"
    if backend == "cuda" and not _extension.CUDA_BUILT and not _extension.LOAD_ERROR:
        if os.environ.get("MIXEDPREC_NO_CUDA", "0") == "1":
            return "mixedprec._C built without CUDA kernels (MIXEDPREC_NO_CUDA=1) (backend 'cuda')"
        homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")  # as setup.py
        if not any(home and os.path.exists(os.path.join(home, "bin", "nvcc")) for home in homes):
            return "no nvcc (CUDA toolkit) to build the CUDA kernels (backend 'cuda')"
    if backend == "triton" and not _extension.TRITON_IMPORTABLE:
        return "triton is not installed (backend 'triton')"
    return None


def backend_device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")


def custom_op(backend: str, name: str):
    """The custom op ``name`` that ``backend``'s ops call (mixedprec/ops/library.py)."""
    return library.custom_op(ops.Backend(backend), name)


def kernel_op(backend: str, name: str):
    """A C++ kernel op of the compiled backend ``backend`` ("cpu", "cuda" or "simt")."""
    return getattr(getattr(torch.ops, NAMESPACES[ops.Backend(backend)]), name)


def require_backend(backend: str, kernels_built: dict[str, bool] | None = None) -> torch.device:
    """The device to test ``backend`` on (with the op's kernel, when given the op's entry of
    ``ops.KERNELS_BUILT``). Skips where the backend needs hardware or a tool this machine lacks;
    fails where it should run here but cannot (a broken build, a GPU that torch does not see,
    TRITON_INTERPRET set against the machine), rather than pass by skipping."""
    device = backend_device(backend)
    usable = backend in ops.available_backends(device) and (device.type != "cuda" or torch.cuda.is_available())
    if usable and (kernels_built is None or kernels_built[backend]):
        return device
    if reason := _missing_hardware_or_tool(backend):
        pytest.skip(reason)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"this machine has a GPU ({gpu_hardware()}) but torch.cuda.is_available() is False: "
                    "backend 'cuda' must run here (check the driver, CUDA_VISIBLE_DEVICES and torch's CUDA build)")
    if backend == "triton" and not _extension.triton_usable(device):
        pytest.fail(f"backend 'triton' must run here on {device} tensors, but TRITON_INTERPRET="
                    f"{os.environ.get('TRITON_INTERPRET', '')!r} was set outside the tests: it must be 1 where "
                    "there is no GPU (Triton's interpreter) and unset or 0 where there is one")
    if backend not in ops.available_backends(device):
        pytest.fail(f"backend {backend!r} must run here: {_extension.missing_reason(backend, device)}")
    pytest.fail(f"backend {backend!r} has no kernel for this op in this build: rebuild mixedprec._C")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """(backend, device) for every kernel backend that can run on this machine."""
    return request.param, require_backend(request.param)


# The build is -march=native (unless MIXEDPREC_CPU_ARCH says otherwise): without AVX-512 it has only
# the scalar code decode (set_cpu_simd(True) runs it too) and no Winograd path (lut_conv2d goes direct).
needs_avx512 = pytest.mark.skipif(not CPU_HAS_AVX512, reason="this CPU has no AVX-512 (avx512f/bw/dq/vl): the "
                                  "build has neither the CPU kernels' SIMD code decode nor their Winograd path")
