"""The `backend` fixture: every op test runs on each backend that can run here, and says why not.

Backend cases (test ids):
  reference           dense plain PyTorch (the spec)                    CPU
  torch               plain PyTorch at O(N*k) memory                    CPU
  cpu                 C++/OpenMP kernels (csrc/cpu)                     CPU
  triton-interpreted  the Triton kernels under TRITON_INTERPRET=1       CPU  (no GPU: set below)
  cuda-emulated       csrc/cuda kernels under the CPU emulation         CPU  (tests/cuda_emulation)
  cuda                csrc/cuda kernels                                 GPU
  triton              the Triton kernels, compiled                      GPU
A test takes every case unless marked `@pytest.mark.backends("cpu", ...)`; `pytest -k cpu` selects
by id. The interpreted and emulated cases are slow: tests give them small shapes only. A parameter
(`pytest.param(..., marks=...)`) marked `backends(...)` is only combined with those cases, one
marked `fast_only` (a large shape) only with the fast ones: the other combinations are deselected
at collection. Kernel tests that compare a backend with the dense reference take `VS_REFERENCE`
(every case but `reference` itself).
"""
import faulthandler
import os
from dataclasses import dataclass

import pytest
import torch

# TRITON_INTERPRET is read when triton compiles a kernel's decorator, so it must be set before
# nformer_kernels (which imports triton) is imported; with a GPU the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nformer_kernels as nk  # noqa: E402
from nformer_kernels import triton as nf_triton  # noqa: E402

# pytest-xdist workers share the cores: one intra-op thread pool per core, not per worker.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# What a bare CUDA machine may lack (it has torch and pytest, maybe triton): a test module whose
# import needs one of these is skipped, naming it, instead of failing the whole collection (the GPU
# selection `pytest tests -m gpu` must collect on such a machine).
OPTIONAL_PACKAGES = frozenset({"hypothesis", "numpy", "scipy", "matplotlib", "torchvision", "faiss", "tqdm", "yaml",
                               "triton", "PIL", "pandas"})

EMULATION_TIMEOUT_S = 600  # a divergent warp collective deadlocks the emulation: fail instead of hanging


@dataclass(frozen=True)
class BackendCase:
    id: str
    name: str  # the nformer_kernels backend name
    device: str
    float64: bool = True
    slow: bool = False  # interpreted or emulated: small shapes only

    def skip_reason(self) -> str:
        if self.device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if self.id == "triton-interpreted" and not nf_triton.interpreted:
            return ("triton runs compiled in this session (a GPU is present or TRITON_INTERPRET=0): "
                    "the `triton` case covers it")
        if self.id == "cuda-emulated":
            return ""  # registered (built) on first use
        why = nk.backends._REGISTRY[self.name].available(torch.device(self.device))
        return why

    def skip_dtype(self, dtype) -> None:
        if dtype == torch.float64 and not self.float64:
            pytest.skip(f"the {self.name} backend rejects float64 by design")

    def kernel(self, name):
        """The batched kernel `name` of this backend (contract: csrc/ops.cpp)."""
        return nk.backends.kernel(self.name, name)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


CASES = [
    BackendCase("reference", "reference", "cpu"),
    BackendCase("torch", "torch", "cpu"),
    BackendCase("cpu", "cpu", "cpu"),
    BackendCase("triton-interpreted", "triton", "cpu", float64=False, slow=True),
    BackendCase("cuda-emulated", "cuda-emulated", "cpu", slow=True),
    BackendCase("cuda", "cuda", "cuda"),
    BackendCase("triton", "triton", "cuda", float64=False),
]
CASE_BY_ID = {case.id: case for case in CASES}
VS_REFERENCE = tuple(case.id for case in CASES if case.id != "reference")
FAST = tuple(case.id for case in CASES if not case.slow)
fast_only = pytest.mark.fast_only
EMULATED, INTERPRETED = "cuda-emulated", "triton-interpreted"


def fast_and(*slow_ids):
    """Parameter mark: the fast cases and the slow cases named (their small shapes)."""
    return pytest.mark.backends(*FAST, *slow_ids)


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*ids): run the test (or parameter) on these backend cases only")
    config.addinivalue_line("markers", "fast_only: a parameter too large for the interpreted/emulated cases")


def missing_optional_package(exc):
    """The optional package whose absence raised exc (or caused it), else None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in OPTIONAL_PACKAGES:
            return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


class _OptionalDepsModule(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as err:
            name = missing_optional_package(err)
            if name is None:
                raise
            pytest.skip(f"needs {name}, which is not installed", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name != "__init__.py":
        return _OptionalDepsModule.from_parent(parent, path=module_path)
    return None


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames or any(
            m.name == "parametrize" and "backend" in m.args[0] for m in metafunc.definition.iter_markers()):
        return
    marker = metafunc.definition.get_closest_marker("backends")
    ids = marker.args if marker else [case.id for case in CASES]
    unknown = set(ids) - set(CASE_BY_ID)
    if unknown:
        raise ValueError(f"unknown backend cases {sorted(unknown)}; known: {list(CASE_BY_ID)}")
    params = [pytest.param(i, marks=[pytest.mark.gpu] if CASE_BY_ID[i].device == "cuda" else []) for i in ids]
    metafunc.parametrize("backend", params, indirect=True, ids=list(ids))


def _case_takes(item) -> bool:
    """Whether a collected test's backend case is among those its parameters' marks allow."""
    case_id = getattr(item, "callspec", None) and item.callspec.params.get("backend")
    if case_id not in CASE_BY_ID:
        return True
    for marker in item.iter_markers("backends"):  # the test's own mark chose the ids: parameters' here
        unknown = set(marker.args) - set(CASE_BY_ID)
        if unknown:
            raise ValueError(f"{item.nodeid}: unknown backend cases {sorted(unknown)}; known: {list(CASE_BY_ID)}")
        if case_id not in marker.args:
            return False
    return not (CASE_BY_ID[case_id].slow and item.get_closest_marker("fast_only"))


def pytest_collection_modifyitems(config, items):
    dropped = [item for item in items if not _case_takes(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if _case_takes(item)]
    for item in items:
        # The emulation runs one thread per CUDA thread through spinning barriers: two emulated
        # launches at once (two pytest-xdist workers) starve each other, so one worker takes them all.
        if getattr(item, "callspec", None) and item.callspec.params.get("backend") == EMULATED:
            item.add_marker(pytest.mark.xdist_group("cuda-emulation"))


@pytest.fixture
def backend(request):
    """The backend case under test, selected for nformer_kernels' public API inside the test."""
    case = CASE_BY_ID[request.param]
    why = case.skip_reason()
    if why:
        pytest.skip(f"backend {case.id!r}: {why}")
    if case.id == "cuda-emulated":
        from tests.cuda_emulation.backend import register
        register()
        faulthandler.dump_traceback_later(EMULATION_TIMEOUT_S, exit=True)
    try:
        with nk.use_backend(case.name):
            yield case
    finally:
        if case.id == "cuda-emulated":
            faulthandler.cancel_dump_traceback_later()


def cpu_backends():
    """The CPU-tensor backends of the public API (module tests)."""
    return ["reference", "cpu"]


from tests.helpers import assert_close_fp32, ties_free  # noqa: E402,F401  (imported from here by module tests)
