"""nformer-bench: benchmarks and GPU validation of nformer_kernels.

  nformer-bench run     sweep N over the fused NFormer and its dense baselines (JSON, Markdown, PNG)
  nformer-bench knn     exact k-NN: nk.knn vs chunked torch.mm + topk vs faiss, with recall
  nformer-bench certified  nk.knn precision="certified" vs "exact" vs torch.mm + topk: stages, certified rows
  nformer-bench distributed  nformer_kernels.distributed on 1..P CPU processes: time, bytes, memory
  nformer-bench eval-features  Re-ID evaluation from features (no Q x G matrix): time, peak RSS
  nformer-bench rerank  k-reciprocal re-ranking (re_ranking_sparse, --dense: vs re_ranking): time, peak RSS
  nformer-bench tune    time the Triton kernels over grids of launch configurations (GPU)
  nformer-bench check   validate nformer_kernels on a CUDA machine in one budgeted run
  nformer-bench report  README sections from result folders

Results go to ./nformer_bench_results in the working directory (or --out), never into the
installed package. `python -m nformer_bench` is the same command; `nformer-bench COMMAND --help`
lists a command's options.
"""
import argparse
import importlib.util
import json
import re
import sys
from importlib import metadata
from pathlib import Path

# The parser imports no nformer_kernels: `check` rebuilds the extension from this process.
from nformer_bench import RESULT_MARK, certified, check, distributed, knn, reid_eval, rerank_bench, sweep, tune
from nformer_bench.arguments import BenchArgumentError, Parser


def version():
    """The nformer_kernels version this nformer_bench runs with, read without importing it."""
    spec = importlib.util.find_spec("nformer_kernels")
    if spec is not None and spec.origin:
        found = re.search(r'^__version__ = "([^"]+)"', Path(spec.origin).read_text(), re.M)
        if found:
            return found.group(1)
    return metadata.version("nformer_kernels")


def _parser():
    parser = Parser(prog="nformer-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nformer-bench {version()}")
    sub = parser.add_subparsers(dest="command",
                                metavar="{run,knn,certified,distributed,eval-features,rerank,tune,check,report}")
    sweep.add_arguments(sub.add_parser("run", help="sweep N and write results", description=sweep.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    knn.add_arguments(sub.add_parser("knn", help="exact k-NN against torch and faiss", description=knn.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    certified.add_arguments(sub.add_parser("certified", help="certified vs exact k-NN: stage split, certified rows",
                                           description=certified.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    distributed.add_arguments(sub.add_parser("distributed", help="nformer_kernels.distributed: per-rank time, bytes, "
                                             "memory; --plan: the analytic cost", description=distributed.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    reid_eval.add_arguments(sub.add_parser("eval-features", help="Re-ID evaluation from features: time, peak RSS",
                                           description=reid_eval.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    rerank_bench.add_arguments(sub.add_parser("rerank", help="k-reciprocal re-ranking: time, peak RSS, speed-up",
                                              description=rerank_bench.__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    tune.add_arguments(sub.add_parser("tune", help="Triton launch-configuration grids (GPU)",
                                      description=tune.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    check.add_arguments(sub.add_parser("check", help="GPU validation: build, smoke, measurements, tests, tuning",
                                       description=check.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    report = sub.add_parser("report", help="write README sections from result folders")
    report.add_argument("folders", nargs="*", type=Path, default=[Path("bench/results")],
                        help="sweep results roots (<root>/<device>/*.json) or `check` output folders "
                             "(default: bench/results)")
    report.add_argument("--readme", type=Path, default=Path("README.md"))
    return parser


def main(argv=None):
    """The CLI: a user error (BenchArgumentError: a bad option, size, device or folder) prints one line
    on stderr and exits with status 2."""
    try:
        return _main(argv)
    except BenchArgumentError as exc:
        print(f"nformer-bench: error: {exc}", file=sys.stderr)
        raise


def _main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # internal: `_worker KIND <json config>` in a child process
        _worker(argv[1], json.loads(argv[2]))
        return 0
    parser = _parser()
    if not argv:
        parser.print_help()
        raise SystemExit(2)
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")  # options alone: a sweep, as `run` takes them
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "run":
        sweep.run(args)
    elif args.command == "knn":
        knn.run(args)
    elif args.command == "certified":
        certified.run(args)
    elif args.command == "distributed":
        distributed.run(args)
    elif args.command == "eval-features":
        reid_eval.run(args)
    elif args.command == "rerank":
        rerank_bench.run(args)
    elif args.command == "tune":
        tune.write(tune.run(args), args.out)
    elif args.command == "check":
        return check.run(args)
    else:
        from nformer_bench.report import update_readme

        missing = [str(folder) for folder in args.folders if not folder.is_dir()]
        if missing:
            raise BenchArgumentError(f"report: no such folder {missing[0]}")
        for folder in args.folders:
            update_readme(folder, args.readme)
    return 0


def _worker(kind, cfg):
    from nformer_bench import runner

    if kind == "check":  # a stage of `check`: it prints its own result lines
        from nformer_bench.check_stages import stage_worker

        stage_worker(cfg)
        return
    result = runner.measure(cfg) if kind == "measure" else runner.agreement(cfg)
    print(RESULT_MARK + json.dumps(result), flush=True)
