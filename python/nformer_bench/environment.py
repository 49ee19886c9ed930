"""Where a benchmark ran: device name and slug, library versions, git commit, memory available, the
source checkout."""
import importlib.util
import os
import platform
import re
import subprocess
from pathlib import Path



def package_dir():
    """The folder of the nformer_kernels being measured, found without importing it (its extension
    may be rebuilt next), or None."""
    spec = importlib.util.find_spec("nformer_kernels")
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None


def source_root():
    """The checkout holding nformer_kernels (setup.py, tests/), or None for an installed package."""
    package = package_dir()
    root = package.parent if package is not None else None
    return root if root is not None and (root / "setup.py").exists() else None


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _git(*cmd):
    """git in the checkout that holds the nformer_kernels being measured (None outside one)."""
    package = package_dir()
    if package is None:
        return None
    try:
        out = subprocess.run(["git", *cmd], cwd=package, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit():
    """HEAD of the checkout being measured; a source copy without .git (an exported tree) names its
    commit in NFORMER_GIT_COMMIT; else None."""
    return _git("rev-parse", "HEAD") or os.environ.get("NFORMER_GIT_COMMIT")


def environment(device):
    import torch

    import nformer_kernels as nk

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = _slug(name)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores)"
        slug = f"cpu-{_slug(_cpu_name())}-{os.cpu_count()}c"
    versions = {"torch": torch.__version__, "python": platform.python_version(),
                "nformer_kernels": nk.__version__, "cuda": torch.version.cuda}
    for mod in ("numpy", "triton", "faiss"):  # optional: None where not installed
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = git_commit()
    return {"device": device.type, "device_name": name, "device_slug": slug, "versions": versions,
            "git_commit": commit, "git_dirty": bool(status) if status is not None else None,
            "torch_threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
            "extension": nk.extension_available(), "extension_cuda": nk.extension_has_cuda()}
