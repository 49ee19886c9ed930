"""nformer-reid: train | eval | features | refine | rerank | demo | datasets.

  nformer-reid demo                                   # synthetic end-to-end NFormer demo (CPU, seconds)
  nformer-reid datasets --root ~/data                 # statistics of the datasets found under a root
  nformer-reid train --data market1501 --root ~/data --pretrained resnet50-19c8e357.pth --out runs/market
  nformer-reid train --data synthetic                 # tiny image-pipeline smoke run (generated images)
  nformer-reid eval --data market1501 --root ~/data --official nformer_model.pth --rerank
  nformer-reid features --query q.pt --gallery g.pt --train train.pt   # features from torchreid / fast-reid
  nformer-reid features --features market_features.pt --train train.pt  # torchreid's qf/gf layout, one file
  nformer-reid refine --input gallery.npy --output refined.npy --weights runs/nformer_features/nformer.pth
  nformer-reid rerank --features market_features.pt --save-ranks 100 --out runs/rerank
  torchrun --nproc-per-node 4 -m nformer_reid refine --distributed --input g.npy --output r.npy --weights n.pth
  torchrun --nproc-per-node 2 -m nformer_reid train --distributed --data market1501 --root ~/data --out runs/m

Options come from four places; the first that sets an option wins:
  KEY=VALUE after the options (or --set KEY=VALUE), e.g. `nformer_steps=100 out=runs/x`: option names
      with dashes or underscores, values read as YAML scalars (100, 1e-4, true, null, [32, 16]);
  the command-line options (--nformer-steps 100);
  the YAML file of --config (option names as keys; required options such as --query may come from it);
  the defaults in nformer_reid/config.py (`--data synthetic` switches train and eval to a seconds-long
      smoke recipe).
Every run that writes an --out folder saves its effective options there as config.yaml: rerun it with
`--config <out>/config.yaml out=<new folder>`. train and eval need torchvision
(pip install nformer_kernels[reid]); features, refine, rerank, demo and datasets do not.
"""
import argparse
import dataclasses
import sys
from typing import List, Optional

import nformer_kernels as nk
from nformer_reid.commands import RUNNERS, Invocation, check_launch
from nformer_reid.config import COMMANDS, OPTION_KEYS, SYNTHETIC, check_values, make_config
from nformer_reid.utils.errors import RankLost, ReIDInputError, one_line
from nformer_reid.utils.logging import reset_logging, setup_logging

EPILOG = """\
outputs:
  Every file is written to a temporary name beside its target and renamed into place, so an
  interrupted or killed run never leaves a truncated file (log.txt, appended line by line, is the
  one exception). A run refuses an --out that already holds one of the files it would write,
  naming them; --overwrite replaces them. An output never replaces one of the run's input files
  (--weights, --resume, --query, --config, ...): that is refused even with --overwrite. A run with
  an --out folder writes config.yaml there once it succeeds (its effective options: rerun with
  --config). Checkpoints only when asked: train writes model_final.pth, and the resumable
  stage*_last.pth with --save-model or --checkpoint-every N; features writes nformer.pth with
  --train, stage2_last.pth with --train --save-model. refine writes the files it names (--output,
  --save-neighbors) and no folder.

torchrun (--distributed):
  train, features and refine take --distributed under `torchrun --nproc-per-node P -m nformer_reid
  ...`. train: both stages under DistributedDataParallel on the single process's global batches
  (each rank loads its share of every batch; --eval on rank 0 at the end). features and refine:
  each rank holds a contiguous share of the rows (refine memory-maps its rows of a .npy --input;
  other formats and features' files are read whole on every rank, each keeping its share), and
  the numbers are the single process's. Only rank 0 writes files, except refine's .npy --output /
  --save-neighbors: rank 0 creates each under a temporary name, every rank writes its rows, and
  rank 0 renames it into place once all have (the folder must be one every rank sees). A check
  that fails on one rank fails on all of them (each prints its line, exit status 2; torchrun
  itself then exits 1); --dist-timeout bounds every wait for the other ranks. Without torchrun
  --distributed is refused, and so is torchrun with more than one process without it.

exit status:
  0    success
  1    an internal error (a bug: please report the traceback)
  2    a user error: a bad option value, a missing / unreadable / malformed file or dataset folder,
       an --out that would lose results, a missing optional dependency, a diverging training;
       one line on stderr names the file or option (--debug shows the traceback)
  130  interrupted (Ctrl-C); files being written are discarded, finished ones are kept
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ReIDInputError (one line, exit 2 via main) instead of
    printing the usage and exiting."""

    def error(self, message):
        raise ReIDInputError(message)


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per field of the command dataclass (and one per alias). Defaults are SUPPRESSed
    so that the namespace holds only what the command line sets; make_config fills in the rest.
    Required options are not argparse-required: the YAML or KEY=VALUE may give them (Validated checks)."""
    for f in dataclasses.fields(cls):
        kwargs = {k: v for k, v in f.metadata.items() if k not in OPTION_KEYS}
        help_text = f.metadata["help"]
        if kwargs.get("action") != "store_true":
            kwargs.setdefault("type", type(f.default))
            if f.metadata.get("required"):
                help_text += " (required)"
            elif f.default is not None:
                shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                help_text += f" (default: {shown})"
        names = ["--" + name.replace("_", "-") for name in (f.name, *f.metadata.get("aliases", ()))]
        parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                            **kwargs)
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="YAML file of option values (command-line options and KEY=VALUE win)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set_values",
                        help="set an option (like KEY=VALUE after the options); repeatable")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a user error instead of one line")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="option overrides after the options, e.g. nformer_steps=100 out=runs/x (win over "
                             "the options and --config)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="nformer-reid", description=__doc__, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nformer_reid {nk.__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a user error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        description = cls.summary
        names = {f.name for f in dataclasses.fields(cls)}
        if "data" in names:
            description += (". --data synthetic replaces the defaults of " + ", ".join(
                "--" + k.replace("_", "-") for k in SYNTHETIC if k in names) + " with a seconds-long smoke recipe")
        _add_options(sub.add_parser(name, help=cls.summary, description=description, epilog=EPILOG,
                                    formatter_class=argparse.RawDescriptionHelpFormatter), cls)
    return parser


def _read_yaml(path: str) -> dict:
    from nformer_reid.utils import yaml_input
    from nformer_reid.utils.io import check_input_file

    path = check_input_file(path, "--config")
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml_input.load(fh, f"--config {path}") or {}
    except OSError as exc:
        raise ReIDInputError(f"--config {path}: cannot be read: {exc.strerror or exc}") from None
    if not isinstance(values, dict):
        raise ReIDInputError(f"--config {path} must hold a mapping of option names to values, "
                             f"got {type(values).__name__}")
    return values


def _parse_override(cls, text: str):
    """KEY=VALUE -> (key, value): the value read as a YAML scalar (or flow list); options of type str
    keep the text as written (`out=2024`, `device=0`), unquoted (`name="a b"`), null / empty = None."""
    from nformer_reid.utils import yaml_input

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or key.startswith("-"):
        raise ReIDInputError(f"expected KEY=VALUE after the options (e.g. seq_len=512), got "
                             f"{yaml_input.short(text)}")
    value = yaml_input.load(raw, f"KEY=VALUE {yaml_input.short(text)[1:-1]}", "the value is not valid YAML") \
        if raw.strip() else None
    f = next((f for f in dataclasses.fields(cls) if key.replace("-", "_") in (f.name, *f.metadata.get("aliases", ()))),
             None)
    plain_str = (f is not None and f.metadata.get("type", type(f.default)) is str and "nargs" not in f.metadata
                 and f.metadata.get("action") != "store_true")
    if plain_str and value is not None and not isinstance(value, str):
        value = raw.strip()
    return key, value


def parse_args(argv: Optional[List[str]] = None):
    """(config, config_file): the command's config dataclass (its `.command` names it) from
    KEY=VALUE (and --set) over the command-line options over the --config YAML over the defaults
    of nformer_reid.config, and the --config path (None without one). ReIDInputError (naming the
    option, and the YAML file or KEY=VALUE for their values) for any bad or missing value."""
    given = vars(build_parser().parse_args(argv))
    given.pop("debug", None)
    cls = COMMANDS[given.pop("command")]
    path = given.pop("config", None)
    texts = given.pop("set_values", []) + given.pop("overrides", [])
    overrides = {}
    for text in texts:
        key, value = _parse_override(cls, text)
        overrides[key] = value  # the last of one key wins (checked for aliases below)
    from_yaml = _read_yaml(path) if path else {}
    from_yaml = check_values(cls, from_yaml, source=path)  # a bad YAML value names the file
    given = check_values(cls, given, flags=True)  # a bad command-line value names the flag
    overrides = check_values(cls, overrides, source="KEY=VALUE")
    return make_config(cls, {**from_yaml, **given, **overrides}, source=None, flags=True), path


def parse_config(argv: Optional[List[str]] = None):
    """The command's config dataclass (see parse_args)."""
    return parse_args(argv)[0]


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Returns 0 on success, 2 after printing a user error (ReIDInputError: a bad
    option, file or folder, a missing optional dependency) as one line on stderr, 1 after one line
    when another rank of a distributed run stopped answering mid-run (RankLost), 130 after
    Ctrl-C; other exceptions propagate (internal errors). --debug re-raises user errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if a in COMMANDS), None)
    prefix = f"nformer-reid {command}" if command else "nformer-reid"
    setup_logging()  # console; the command adds <out>/log.txt once its checks have passed
    try:
        cfg, config_file = parse_args(argv)
        check_launch(cfg)
        RUNNERS[cfg.command](cfg, Invocation(("nformer-reid", *argv), config_file))
    except ReIDInputError as exc:
        if debug:
            raise
        print(f"{prefix}: {one_line(exc)}", file=sys.stderr)
        return 2
    except RankLost as exc:  # another rank failed mid-run; its own output has the cause
        if debug:
            raise
        print(f"{prefix}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted (files being written were discarded)", file=sys.stderr)
        return 130
    finally:
        reset_logging()  # leave the process as found (main may run many times in one process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
