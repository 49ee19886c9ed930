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
import os
import sys
from typing import List, Optional

import nformer_kernels as nk
from nformer_reid.commands import RUNNERS
from nformer_reid.config import COMMANDS, SYNTHETIC, make_config
from nformer_reid.utils.deps import MissingDependency
from nformer_reid.utils.logging import reset_logging, setup_logging


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per field of the command dataclass. Defaults are SUPPRESSed so that the
    namespace holds only what the command line sets; make_config fills in the rest."""
    for f in dataclasses.fields(cls):
        kwargs = dict(f.metadata)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nformer-reid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nformer_reid {nk.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        description = cls.summary
        names = {f.name for f in dataclasses.fields(cls)}
        if "data" in names:
            description += (". --data synthetic replaces the defaults of " + ", ".join(
                "--" + k.replace("_", "-") for k in SYNTHETIC if k in names) + " with a seconds-long smoke recipe")
        _add_options(sub.add_parser(name, help=cls.summary, description=description), cls)
    return parser


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"nformer-reid: {path} must hold a mapping of option names to values")
    return values


def parse_config(argv: Optional[List[str]] = None):
    """The command's config dataclass (its `.command` names it): the command line over the --config
    YAML over the defaults of nformer_reid.config."""
    given = vars(build_parser().parse_args(argv))
    cls = COMMANDS[given.pop("command")]
    path = given.pop("config", None)
    from_yaml = _read_yaml(path) if path else {}
    try:
        make_config(cls, from_yaml, source=path)  # reports a bad YAML value with the file's name
        return make_config(cls, {**{str(k).replace("-", "_"): v for k, v in from_yaml.items()}, **given},
                           source=path or "command line")
    except ValueError as exc:
        raise SystemExit(f"nformer-reid: {exc}") from None


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; 0 on success, 2 (one line on stderr) when an optional dependency is missing."""
    cfg = parse_config(argv)
    out = getattr(cfg, "out", None)
    if out:
        os.makedirs(out, exist_ok=True)
    setup_logging(os.path.join(out, "log.txt") if out else None)
    try:
        RUNNERS[cfg.command](cfg)
    except MissingDependency as exc:
        print(f"nformer-reid {cfg.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        reset_logging()  # leave the process as found (main may run many times in one process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
