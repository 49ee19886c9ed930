"""Build nformer_kernels and its C++/CUDA extension.

`pip install --no-build-isolation .` in an environment that already has torch
(`".[reid]"` adds torchvision for nformer_reid, `".[bench]"` faiss for nformer-bench).
CUDA sources (csrc/cuda) are compiled when torch has CUDA and a toolkit is found
(CUDA_HOME); NFORMER_BUILD_CUDA=0 forces a CPU-only build. TORCH_CUDA_ARCH_LIST
overrides the target archs (default: the visible GPU's arch, else 8.0;8.6;8.9;9.0).
"""
import glob
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - build-time message
    sys.exit("nformer_kernels needs torch installed first: pip install torch, then "
             "pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))
URL = "https://github.com/nformer-kernels/nformer_kernels"


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def _version():
    """nformer_kernels.__version__, the one place the version is written."""
    return re.search(r'^__version__ = "([^"]+)"', _read("nformer_kernels", "__init__.py"), re.M).group(1)


def _want_cuda():
    if os.environ.get("NFORMER_BUILD_CUDA", "1") == "0":
        return False, "NFORMER_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, ""


def _default_archs():
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0"


def _build_helpers():
    """nformer_kernels/_build.py, loaded by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("nformer_kernels_build", os.path.join(ROOT, "nformer_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BuildExtension(BuildExtension):
    """torch's BuildExtension (ninja when installed); without ninja, which compiles one source after
    another, the sources compile in MAX_JOBS (default: all cores) forked processes."""

    def build_extensions(self):
        if not self.use_ninja:  # torch turned it off: ninja is not installed
            helpers = _build_helpers()
            jobs = helpers.default_jobs()
            print(f"nformer_kernels: ninja is not installed; compiling {jobs} sources at a time.")
            helpers.parallel_compile(self.compiler, jobs)
        super().build_extensions()


def extensions():
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # setuptools rebuilds only when a source or one of these is newer than the built extension.
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs (C++20 since 2.14)
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda, why_not = _want_cuda()
    if not with_cuda:
        print(f"nformer_kernels: building the CPU extension only ({why_not}).")
        return [CppExtension("nformer_kernels._C", sources, include_dirs=include_dirs, depends=headers,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    _default_archs()
    print(f"nformer_kernels: building CPU + CUDA extension for archs {os.environ['TORCH_CUDA_ARCH_LIST']}.")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return [CUDAExtension("nformer_kernels._C", sources, include_dirs=include_dirs, depends=headers,
                          define_macros=[("NFORMER_WITH_CUDA", None)],
                          # No --use_fast_math: its flush-to-zero and approximate division would void the
                          # knn kernels' error bounds (docs/design.md); the attention's exp is __expf itself.
                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                          extra_link_args=["-fopenmp"])]


setup(
    name="nformer_kernels",
    version=_version(),
    description="Fused O(N*k) kernels and modules for NFormer (CVPR 2022) person re-identification",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    author="nformer_kernels contributors",
    maintainer="nformer_kernels contributors",
    url=URL,
    project_urls={"Source": URL, "Issues": f"{URL}/issues", "Changelog": f"{URL}/blob/main/CHANGELOG.md",
                  "Design": f"{URL}/blob/main/docs/design.md",
                  "Paper": "https://openaccess.thecvf.com/content/CVPR2022/html/Wang_NFormer_Robust_Person_"
                           "Re-Identification_With_Neighbor_Transformer_CVPR_2022_paper.html"},
    license="MIT",
    license_files=["LICENSE"],
    keywords=["person re-identification", "NFormer", "transformer", "k-nearest neighbours", "sparse attention",
              "pytorch", "triton", "cuda"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    # One top-level package each: the library, the Re-ID application and the benchmarks.
    packages=find_packages(include=["nformer_kernels", "nformer_kernels.*"])
    + find_packages("python", include=["nformer_reid", "nformer_reid.*", "nformer_bench", "nformer_bench.*"]),
    package_dir={"nformer_reid": "python/nformer_reid", "nformer_bench": "python/nformer_bench"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "pyyaml"],
    extras_require={"reid": ["torchvision"],  # nformer_reid's backbone and image pipeline
                    "bench": ["faiss-cpu", "pytest-benchmark"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "torchvision"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["nformer-reid=nformer_reid.cli:main", "nformer-bench=nformer_bench.cli:main"]},
)
