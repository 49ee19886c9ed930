"""nformer-reid: train | eval | features | demo | datasets.

  nformer-reid demo                                   # synthetic end-to-end NFormer demo (CPU, seconds)
  nformer-reid datasets --root ~/data                 # statistics of the datasets found under a root
  nformer-reid train --data market1501 --root ~/data --pretrained resnet50-19c8e357.pth --out runs/market
  nformer-reid train --data synthetic                 # tiny image-pipeline smoke run (generated images)
  nformer-reid eval --data market1501 --root ~/data --official nformer_model.pth --rerank
  nformer-reid features --query q.pt --gallery g.pt --train train.pt   # features from torchreid / fast-reid

A YAML file given with --config sets any option by its long name (dashes or underscores);
options given on the command line win. The defaults live in nformer_reid/config.py
(`--data synthetic` switches train and eval to a seconds-long smoke recipe). train and eval
need torchvision (pip install nformer_kernels[reid]); features, demo and datasets do not.
"""
import argparse
import dataclasses
import sys
from typing import List, Optional

import nformer_kernels as nk
from nformer_reid.commands import RUNNERS
from nformer_reid.config import COMMANDS, SYNTHETIC, check_values, make_config
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.logging import reset_logging, setup_logging

EPILOG = """\
outputs:
  Every file is written to a temporary name beside its target and renamed into place, so an
  interrupted or killed run never leaves a truncated file (log.txt, appended line by line, is the
  one exception). A run refuses an --out that already holds one of the files it would write,
  naming them; --overwrite replaces them. An output never replaces one of the run's input files
  (--weights, --resume, --query, ...): that is refused even with --overwrite.

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
    """One --option per field of the command dataclass. Defaults are SUPPRESSed so that the
    namespace holds only what the command line sets; make_config fills in the rest."""
    for f in dataclasses.fields(cls):
        kwargs = {k: v for k, v in f.metadata.items() if k != "check"}
        help_text = kwargs.pop("help")
        if kwargs.get("action") != "store_true":
            kwargs.setdefault("type", type(f.default))
            if not kwargs.get("required") and f.default is not None:
                shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                help_text += f" (default: {shown})"
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=help_text.replace("%", "%%"), **kwargs)
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="YAML file of option values (options given on the command line win)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a user error instead of one line")


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
    import yaml

    from nformer_reid.utils.io import check_input_file

    path = check_input_file(path, "--config")
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ReIDInputError(f"--config {path}: not valid YAML: {reason[:200]}") from None
    if not isinstance(values, dict):
        raise ReIDInputError(f"--config {path} must hold a mapping of option names to values, "
                             f"got {type(values).__name__}")
    return values


def parse_config(argv: Optional[List[str]] = None):
    """The command's config dataclass (its `.command` names it): the command line over the --config
    YAML over the defaults of nformer_reid.config. ReIDInputError (naming the option, and the YAML
    file for its values) for any bad value."""
    given = vars(build_parser().parse_args(argv))
    given.pop("debug", None)
    cls = COMMANDS[given.pop("command")]
    path = given.pop("config", None)
    from_yaml = _read_yaml(path) if path else {}
    from_yaml = check_values(cls, from_yaml, source=path)  # a bad YAML value names the file
    given = check_values(cls, given, flags=True)  # a bad command-line value names the flag
    return make_config(cls, {**from_yaml, **given}, source=None, flags=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Returns 0 on success, 2 after printing a user error (ReIDInputError: a bad
    option, file or folder, a missing optional dependency) as one line on stderr, 130 after
    Ctrl-C; other exceptions propagate (internal errors). --debug re-raises user errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if a in COMMANDS), None)
    prefix = f"nformer-reid {command}" if command else "nformer-reid"
    setup_logging()  # console; the command adds <out>/log.txt once its checks have passed
    try:
        cfg = parse_config(argv)
        RUNNERS[cfg.command](cfg)
    except ReIDInputError as exc:
        if debug:
            raise
        print(f"{prefix}: {_one_line(exc)}", file=sys.stderr)
        return 2
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
