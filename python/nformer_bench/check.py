"""nformer-bench check: validate nformer_kernels on a CUDA machine in one run, optionally inside a time budget.

  nformer-bench check OUT_DIR [--budget-s S] [--dry-run]        (scripts/gpu_check.sh wraps it)

Stages, in this order; results are written into OUT_DIR as they come (gpu_check.json replaced
atomically after every stage). Without --budget-s every stage runs to its end, within a cap that
only stops a hung stage (STAGE_CAP_S); with it, the measurement stages get a share of the budget
and a stage that would start after the budget is spent is recorded as skipped:

  build      environment (nvidia-smi, versions, commit, ninja), then the extension compiled in place
             for the visible GPU's arch only (in a source checkout; an installed package is used
             as is); without ninja, setup.py compiles MAX_JOBS sources at a time itself
  smoke      every backend on the GPU against the `reference` backend, a few seconds each: knn
             index tensors identical (fp32, bf16, near-duplicates exact, certified margin 0 = every
             row rescanned by knn_rows, a bf16 batch of one item per SM = the CUDA knn's 128-row
             tiles the 1M measurement runs), reciprocal_mask, neighbor_attention forward + backward, the NFormer eval
             forward against the dense official model; a backend stops at its first failing case
  knn        N=1,000,000, d=256, k=20, bf16 then fp32: nk.knn per backend vs chunked torch.mm + topk
  attention  neighbor_attention forward + backward at N=1,000,000, d=256: achieved GB/s
  nformer    NFormer eval at N=19,281 / 93,820 / 1,000,000 (Market-1501, MSMT17, 1M) vs the dense
             official computation and a dense SDPA transformer, where they fit
  tests      python -m pytest tests -m gpu (JUnit XML), its selection collected first
             (`tests.gpu_selected`); the dry run collects it and runs a few CPU tests
  tune       the Triton launch-configuration grids (nformer-bench tune), with the time left

Measurements use the backends whose smoke check passed. Each stage runs in a process of its own
(a GPU fault ends that stage, not the run); with a budget, the measurement stages run within a
share of it, so the test suite keeps time. Nothing needs more than torch (and triton for its
backend): numpy, matplotlib (the plots are skipped with a note), hypothesis, scipy, torchvision
and faiss are optional (test modules that need them are skipped). The stages' child-process side
is check_stages.py, the processes themselves check_process.py. The result is a compact, flat folder: gpu_check.log, gpu_tests.xml,
gpu_check.json, gpu_check.md, nformer-latency.png and nformer-memory.png; `nformer-bench report
OUT_DIR` turns it into the README's GPU table.

--dry-run runs every stage on the CPU at tiny sizes and leaves the same files, in about two
minutes: the build stage only checks that the extension is built, the smoke stage also checks the
triton backend under TRITON_INTERPRET=1 and, in a source checkout with ninja, csrc/cuda's kernel
bodies under the CPU emulation of tests/cuda_emulation (backend `cuda-emulated`; neither measured), the tests stage collects the GPU selection and
runs a few CPU tests, and tuning runs under TRITON_INTERPRET=1. It tests this command on a machine without a GPU.
Exit status 1 when a stage or a test failed, else 0.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from nformer_bench.arguments import positive_float
from nformer_bench.check_process import child_env, stream
from nformer_bench.check_stages import EMULATED, SMOKE_CASES
from nformer_bench.environment import source_root
from nformer_reid.utils.io import atomic_write

LOG, JUNIT, JSON, MD, LATENCY_PNG, MEMORY_PNG = FILES = (
    "gpu_check.log", "gpu_tests.xml", "gpu_check.json", "gpu_check.md", "nformer-latency.png", "nformer-memory.png")
STAGES = ("build", "smoke", "knn", "attention", "nformer", "tests", "tune")
# With --budget-s: the measurement stages' shares of it; the build, tests and tune stages get the time left.
SHARE = {"smoke": 0.12, "knn": 0.2, "attention": 0.06, "nformer": 0.2}
# Without: each stage's cap, which only ends a hung stage (a compile without ninja, the whole GPU suite).
STAGE_CAP_S = {"build": 1800, "smoke": 900, "knn": 1200, "attention": 900, "nformer": 2400, "tests": 3600,
               "tune": 3600}
MIN_STAGE_S = 5.0  # a stage with less time left than this is skipped

SIZES = {  # per mode: (dry run?) -> stage -> parameters
    False: {"smoke": {"n": 4096, "d": 256, "k": 20, "heads": 2, "landmarks": 5, "nformer_n": 512, "nformer_d": 64},
            # (dtype, nk.knn precision): the default (certified: fp16 tensor-core stage 1) on bf16 and fp32
            # rows, and exact fp32 (an FMA stage 1; backends._AUTOMATIC_KERNEL's rule, timed per backend)
            "knn": {"n": 1_000_000, "d": 256, "k": 20, "repeats": 3,
                    "cases": [["bfloat16", "auto"], ["float32", "auto"], ["float32", "exact"]],
                    "repeat_budget_s": 5.0},
            "attention": {"n": 1_000_000, "d": 256, "k": 20, "heads": 2, "landmarks": 5,
                          "dtypes": ["bfloat16", "float32"], "repeats": 5, "repeat_budget_s": 3.0},
            "nformer": {"n_list": [19281, 93820, 1_000_000], "d": 256, "ffn": 1024, "check_n": 1000, "repeats": 3,
                        "repeat_budget_s": 10.0},
            "tune": {"n": 100_000, "d": 256, "k": 20, "repeats": 3,
                     # The 8 configurations of each grid expected to gain most (tune.knn_gain_order,
                     # attention_gain_order; compiles dominate, ~4 s each): a first run measures the likely
                     # winners; `nformer-bench tune` runs a whole grid.
                     "specs": [["knn", "bfloat16", 8], ["attention", "bfloat16", 8], ["knn", "float32", 8],
                               ["cuda-knn", "float16", 0]]}},
    True: {"smoke": {"n": 256, "d": 32, "k": 8, "heads": 2, "landmarks": 5, "nformer_n": 120, "nformer_d": 32},
           # the CUDA kernel bodies under the CPU emulation (a thread per CUDA thread): smaller still
           "smoke_emulated": {"n": 128, "d": 16, "k": 6, "heads": 2, "landmarks": 5, "nformer_n": 48,
                              "nformer_d": 16},
           "knn": {"n": 2000, "d": 64, "k": 20, "repeats": 2,
                   "cases": [["bfloat16", "auto"], ["float32", "auto"], ["float32", "exact"]],
                   "repeat_budget_s": 1.0},
           "attention": {"n": 1000, "d": 64, "k": 20, "heads": 2, "landmarks": 5, "dtypes": ["bfloat16", "float32"],
                         "repeats": 2, "repeat_budget_s": 1.0},
           "nformer": {"n_list": [100, 200, 400], "d": 64, "ffn": 256, "check_n": 100, "repeats": 2,
                       "repeat_budget_s": 1.0},
           "tune": {"n": 40, "d": 16, "k": 5, "repeats": 1,
                    "specs": [["knn", "float32", 3], ["attention", "float32", 3]]}},
}
# The GPU suite, and in a dry run a few CPU tests that exercise the same JUnit path.
TEST_ARGS = {False: ["tests", "-m", "gpu"],
             True: ["tests/test_modules.py", "-k", "from_official_matches", "-m", "not gpu"]}


def add_arguments(p):
    p.add_argument("out", type=Path, help="output folder (created; check files already in it are replaced)")
    p.add_argument("--budget-s", type=positive_float, default=None,
                   help="total wall-clock budget of all stages (default: none, every stage runs to its end)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (no GPU needed)")
    p.add_argument("--stages", type=stage_list, default=None,
                   help="comma-separated measurement stages to run (of " + ",".join(MEASURED) + "; default: "
                        "all); build and smoke always run: nothing is measured before it is checked")


MEASURED = STAGES[2:]


def stage_list(text):
    names = [tok.strip() for tok in text.split(",") if tok.strip()]
    unknown = [name for name in names if name not in MEASURED]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected stages among {','.join(MEASURED)}, got {text!r}")
    return names


def run(args):
    return Check(args.out, args.budget_s, args.dry_run, args.stages).run()


class Check:
    """One validation run: stages in order, each recorded in result and saved as it goes."""

    def __init__(self, out, budget_s, dry_run, stages=None):
        self.out, self.budget_s, self.dry_run = Path(out), budget_s, dry_run
        self.selected = set(STAGES[:2]) | set(stages or MEASURED)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # a rerun into the same folder replaces the previous run
            (self.out / name).unlink(missing_ok=True)
        self.t0 = time.monotonic()
        self.root = source_root()
        self.device = "cpu" if dry_run else "cuda"
        self.sizes = SIZES[dry_run]
        self.passed = []  # backends whose smoke check passed
        self.abort = None  # why the remaining stages cannot run
        self.result = {"meta": {"budget_s": budget_s, "dry_run": dry_run, "device": self.device,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "command": f"nformer-bench check {out}"
                                           + (f" --budget-s {budget_s:g}" if budget_s is not None else "")
                                           + (" --dry-run" if dry_run else "")
                                           + (f" --stages {','.join(stages)}" if stages else ""),
                                "complete": False},
                       "stages": [], "build": {}, "smoke": [], "knn": [], "attention": [],
                       "nformer": {"meta": {}, "agreement": [], "rows": []}, "tests": {}, "tune": []}
        self._log = open(self.out / LOG, "a", buffering=1)

    # ------------------------------------------------------------------ bookkeeping
    def left(self):
        if self.budget_s is None:
            return math.inf
        return self.budget_s - (time.monotonic() - self.t0)

    def stage_limit(self, name):
        """Seconds stage `name` may run: its share of the budget (or the time left), else its cap."""
        if self.budget_s is None:
            return float(STAGE_CAP_S[name])
        return min(self.left(), SHARE[name] * self.budget_s) if name in SHARE else self.left()

    def log(self, text):
        self._log.write(text + "\n")
        print(text, flush=True)

    def save(self):
        from nformer_bench import report

        for name, text in ((JSON, json.dumps(self.result, indent=1) + "\n"), (MD, report.check_markdown(self.result))):
            with atomic_write(self.out / name, "w") as fh:  # a reader, or a kill meanwhile, sees old or new
                fh.write(text)

    def _plots(self):
        from nformer_bench import report

        nf = self.result["nformer"]
        meta = {"device_name": nf["meta"].get("device_name") or self.result["meta"].get("device_name", self.device),
                "dtype": nf["meta"].get("dtype", "float32")}
        try:
            report.plot_run({"meta": meta, "rows": nf["rows"]}, self.out / LATENCY_PNG, self.out / MEMORY_PNG)
        except ImportError as exc:  # a bare machine: the numbers are in the JSON and the summary
            self.result["meta"]["plots"] = f"skipped: {exc.name or exc} is not installed"
            self.log(f"plots {self.result['meta']['plots']}")

    def run(self):
        mode = "dry run on the CPU" if self.dry_run else "CUDA"
        budget = f"budget {self.budget_s:g} s" if self.budget_s is not None else "no budget"
        self.log(f"nformer-bench check ({mode}), {budget}, output {self.out}")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # e.g. `timeout`: still save what ran
        try:
            for name in STAGES:
                self._stage(name)
        finally:
            self.save()  # the results first: the plots come after, from them
            self._plots()
            if self.result["tests"].get("status") is None:  # the tests stage never ran
                self._junit_placeholder("the tests stage was not selected" if "tests" not in self.selected
                                        else "the run ended before the tests stage")
            # complete: every stage ran to its end (none cut short or skipped for lack of time)
            self.result["meta"]["complete"] = len(self.result["stages"]) == len(STAGES) and not any(
                s["status"].startswith(("timeout", "skipped (budget")) for s in self.result["stages"])
            self.result["meta"]["wall_s"] = round(time.monotonic() - self.t0, 1)
            self.save()
            self._log.close()
        failed = [s for s in self.result["stages"] if s["status"].startswith("failed")]
        print(f"\n{len(self.result['stages'])} stages in {self.result['meta']['wall_s']:.0f} s"
              + (f"; failed: {', '.join(s['name'] for s in failed)}" if failed else "; none failed")
              + f". Files in {self.out}: {', '.join(sorted(p.name for p in self.out.iterdir()))}")
        return 1 if failed else 0

    def _stage(self, name):
        limit = self.stage_limit(name)
        record = {"name": name, "status": "", "seconds": 0.0, "limit_s": round(limit, 1)}
        self.result["stages"].append(record)
        if name not in self.selected:
            record["status"] = "skipped (not selected)"
        elif self.abort:
            record["status"] = f"skipped ({self.abort})"
        elif limit < MIN_STAGE_S:
            record["status"] = f"skipped (budget spent: {max(self.left(), 0):.0f} s left)"
        else:
            left = f", {self.left():.0f} s of the budget left" if self.budget_s is not None else ""
            self.log(f"\n=== {name} (up to {limit:.0f} s{left})")
            start = time.monotonic()
            try:
                record["status"] = getattr(self, "_" + name)(limit)
            except Exception as exc:  # noqa: BLE001 - one stage's bug must not lose the others
                record["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            record["seconds"] = round(time.monotonic() - start, 1)
        self.log(f"--- {name}: {record['status']} ({record['seconds']:.0f} s)")
        if name == "tests" and record["status"].startswith("skipped") and name in self.selected:
            self._junit_placeholder(record["status"])
        self.save()

    # ------------------------------------------------------------------ processes
    def _stream(self, cmd, limit_s, on_item=None, env=None, lines=None):
        """check_process.stream in the source root, into this check's log; gpu_check.json is saved
        after every result item."""
        def take(item):
            on_item(item)
            self.save()
        return stream(cmd, limit_s, self.log, self.root or Path.cwd(), take if on_item else None, env, lines)

    def _worker(self, stage, limit_s, on_item, extra_env=None, **cfg):
        cmd = [sys.executable, "-m", "nformer_bench", "_worker", "check",
               json.dumps({"stage": stage, "device": self.device, "limit_s": limit_s, **cfg})]
        return self._stream(cmd, limit_s, on_item, env=child_env(extra_env))

    # ------------------------------------------------------------------ stages
    def _build(self, limit):
        deadline = time.monotonic() + limit
        compile_failed = None
        build, meta = self.result["build"], self.result["meta"]
        status = self._worker("probe", min(limit, 120), lambda item: build.update(item))
        meta.update({key: build.get(key) for key in ("device_name", "capability", "versions", "git_commit")})
        if status != "ok":
            self.abort = "the environment probe failed"
            return f"failed: environment probe {status}"
        if shutil.which("nvidia-smi") and not self.dry_run:
            self._stream(["nvidia-smi"], 30)
        if self.dry_run:
            build["compile"] = "skipped (dry run)"
        elif self.root is None:
            build["compile"] = "skipped (an installed package, not a source checkout)"
        elif not build.get("capability"):
            self.abort = "no CUDA device; --dry-run checks this command on the CPU"
            return "failed: no CUDA device visible to torch"
        else:
            arch = build["capability"]
            extra = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
            if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
                extra["CUDA_HOME"] = "/usr/local/cuda"
            self.log(f"compiling the extension for sm_{arch.replace('.', '')} only: setup.py build_ext --inplace")
            if not build.get("ninja"):
                self.log(f"ninja is not installed: setup.py compiles {extra['MAX_JOBS']} sources at a time in "
                         "forked processes instead (nformer_kernels/_build.py)")
            # pip's CUDA headers (cusparse.h, ...) sit beside torch, in whichever site folder holds it.
            sites = dict.fromkeys(Path(p) for p in (build.get("torch_site"), sysconfig.get_paths()["purelib"]) if p)
            headers = [str(p) for site in sites for p in sorted(site.glob("nvidia/cu*/include"))]
            if headers:
                extra["CPATH"] = os.pathsep.join(filter(None, [*headers, os.environ.get("CPATH")]))
            t = time.monotonic()
            status = self._stream([sys.executable, "setup.py", "build_ext", "--inplace"],
                                  max(deadline - time.monotonic(), MIN_STAGE_S), env=child_env(extra))
            build["compile"] = f"{status} ({time.monotonic() - t:.0f} s, TORCH_CUDA_ARCH_LIST={arch})"
            # On a failed compile the later stages still check what runs (the triton backend needs no build).
            compile_failed = status != "ok" and f"failed: compile {status}"
            if status.startswith("timeout"):
                compile_failed = (f"failed: the compile did not finish in {limit:.0f} s (the build stage's cap): "
                                  "build first (python setup.py build_ext --inplace), or give a larger --budget-s")
        status = self._worker("extension", max(min(deadline - time.monotonic(), 120), MIN_STAGE_S),
                              lambda item: build.update(item))
        meta.update({key: build.get(key) for key in ("device_name", "device_slug", "git_commit", "git_dirty")
                     if build.get(key) is not None})
        if status != "ok":
            self.abort = "nformer_kernels does not import"
            return f"failed: importing nformer_kernels {status}"
        if compile_failed:
            return compile_failed
        if not build.get("extension"):
            return "failed: the compiled extension does not load"
        if not self.dry_run and not build.get("extension_cuda"):
            return "failed: the extension has no CUDA kernels"
        return "ok"

    def _interpreted(self):
        """Backends the dry run smoke-checks under the Triton interpreter (the GPU run's code path,
        at tiny sizes) but does not measure: triton, when it is installed."""
        return ["triton"] if self.dry_run and self.result["build"].get("versions", {}).get("triton") else []

    def _emulated(self):
        """Backends the dry run smoke-checks with csrc/cuda's kernel bodies on the CPU (the GPU run's
        CUDA code, at tiny sizes; not measured): the emulation of tests/cuda_emulation, in a source
        checkout where ninja can JIT-build it."""
        if not self.dry_run or self.root is None or not self.result["build"].get("ninja"):
            return []
        return [EMULATED] if (self.root / "tests" / "cuda_emulation" / "backend.py").is_file() else []

    def _smoke(self, limit):
        # A process per backend: a kernel fault that poisons the CUDA context fails that backend only.
        deadline = time.monotonic() + limit
        statuses = []
        backends = [b for b in self.result["build"].get("backends", []) if b != "reference"]
        for backend in backends + [b for b in self._interpreted() + self._emulated() if b not in backends]:
            left = deadline - time.monotonic()
            if left < MIN_STAGE_S:
                statuses.append(f"timeout (no time left for {backend})")
                break
            extra, sizes = None, self.sizes["smoke"]
            if backend in self._interpreted():
                extra = {"TRITON_INTERPRET": "1"}
            elif backend in self._emulated():
                extra, sizes = {"NFORMER_EMULATED_SM_COUNT": "2"}, self.sizes["smoke_emulated"]
            statuses.append(self._worker("smoke", left, self.result["smoke"].append, extra_env=extra,
                                         backend=backend, **sizes))
        status = next((st for st in statuses if st != "ok"), "ok")
        by_backend = {}
        for case in self.result["smoke"]:
            by_backend.setdefault(case["backend"], []).append(case)
        self.passed = [b for b, cases in by_backend.items() if all(c["ok"] for c in cases)
                       and len(cases) == len(SMOKE_CASES)]
        failed = [f"{b}: {cases[-1]['case']}" for b, cases in by_backend.items() if not cases[-1]["ok"]]
        if failed:
            return "failed: " + "; ".join(failed)
        if status != "ok":
            return status
        return "ok" if by_backend else "failed: no backend ran"

    def _kernel_backends(self):
        from nformer_bench.analytic import PLAIN_BACKENDS

        return [b for b in self.passed if b not in PLAIN_BACKENDS and b not in self._interpreted() + self._emulated()]

    def _knn(self, limit):
        return self._worker("knn", limit, self.result["knn"].append, backends=self._kernel_backends(),
                            **self.sizes["knn"])

    def _attention(self, limit):
        if not self._kernel_backends():
            return "skipped (no kernel backend passed the smoke check)"
        return self._worker("attention", limit, self.result["attention"].append,
                            backends=self._kernel_backends(), **self.sizes["attention"])

    def _nformer(self, limit):
        nf = self.result["nformer"]

        def on_item(item):
            kind = item.pop("kind")
            if kind == "meta":
                nf["meta"] = item
            else:
                nf[kind].append(item)

        return self._worker("nformer", limit, on_item, backends=self._kernel_backends(), **self.sizes["nformer"])

    def _tests(self, limit):
        tests = self.result["tests"]
        if self.root is None or not (self.root / "tests").is_dir():
            tests["status"] = "skipped (no tests folder: not a source checkout)"
            return tests["status"]
        deadline = time.monotonic() + limit
        selected = self._gpu_selection(min(limit / 2, 300))
        if isinstance(selected, str):
            tests["status"] = selected
            return selected
        tests["gpu_selected"] = selected
        limit = deadline - time.monotonic()
        junit = self.out / JUNIT
        cmd = [sys.executable, "-m", "pytest", *TEST_ARGS[self.dry_run], "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        tests["command"] = " ".join(["pytest", *TEST_ARGS[self.dry_run]])
        status = self._stream(cmd, limit)
        tests.update(_junit_counts(junit))
        if not junit.exists():
            self._junit_placeholder(f"pytest left no JUnit XML ({status})")
        tests["status"] = status
        if status.startswith("timeout"):
            return status
        if tests.get("failures") or tests.get("errors"):
            return f"failed: {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors"
        # pytest exits 5 when nothing was collected (e.g. no GPU test selected): not a failure of the code
        return "ok" if status in ("ok", "failed (exit 5)") else status

    def _gpu_selection(self, limit):
        """The number of tests `pytest tests -m gpu` selects (collected here, on any machine), or a
        failed status: a collection error or an empty selection is never "0 tests, ok"."""
        lines = []
        cmd = [sys.executable, "-m", "pytest", *TEST_ARGS[False], "--collect-only", "-qq", "-p", "no:cacheprovider"]
        status = self._stream(cmd, limit, lines=lines)
        if status not in ("ok", "failed (exit 5)"):  # pytest exits 5 when it selected nothing
            return f"failed: collecting the GPU test selection: {status}"
        count = sum(int(m.group(1)) for m in map(re.compile(r"^\S+\.py: (\d+)$").match, lines) if m)
        return count or "failed: the GPU test selection is empty"

    def _tune(self, limit):
        extra = {"TRITON_INTERPRET": "1"} if self.dry_run else None
        return self._worker("tune", limit, self.result["tune"].append, extra_env=extra, **self.sizes["tune"])

    def _junit_placeholder(self, reason):
        """A JUnit XML naming why there are no test results, so the folder always has the same files."""
        path = self.out / JUNIT
        if path.exists():
            return
        suite = ET.Element("testsuite", name="nformer-bench check", tests="1", errors="0", failures="0", skipped="1")
        case = ET.SubElement(suite, "testcase", classname="nformer_bench.check", name="tests stage")
        ET.SubElement(case, "skipped", message=reason)
        root = ET.Element("testsuites")
        root.append(suite)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
        self.result["tests"].setdefault("status", reason)


def _junit_counts(path):
    """tests/failures/errors/skipped/time summed over a JUnit XML's suites, and the failing cases."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(float(s.get(key, 0))) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}"
                        for s in suites for case in s.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None][:30]
    return counts
