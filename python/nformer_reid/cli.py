"""nformer-reid: train | eval | features | demo | datasets (argparse, optional YAML config).

  nformer-reid demo                                   # synthetic end-to-end NFormer demo (CPU, minutes)
  nformer-reid datasets --root ~/data                 # statistics of the datasets found under a root
  nformer-reid train --data market1501 --root ~/data --pretrained resnet50-19c8e357.pth --out runs/market
  nformer-reid train --data synthetic                 # tiny image-pipeline smoke run (generated images)
  nformer-reid eval --data market1501 --root ~/data --official nformer_model.pth --rerank
  nformer-reid features --query q.pt --gallery g.pt --train train.pt   # features from torchreid / fast-reid

A YAML file given with --config sets any option by its long name (dashes or underscores);
options given on the command line win.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import torch

# Recipe defaults (official NFormer / reid-strong-baseline) and the tiny synthetic smoke settings.
RECIPES = {
    "default": dict(arch="resnet50", size=[256, 128], batch_size=64, num_instances=4, epochs=120, max_steps=None,
                    lr=3.5e-4, milestones=[40, 70], warmup_epochs=10, workers=4, nformer_epochs=20,
                    nformer_steps=None, seq_len=7000, nformer_batch=2, nformer_lr=1e-5, test_batch=128),
    "synthetic": dict(arch="resnet18", size=[64, 32], batch_size=16, num_instances=4, epochs=1, max_steps=2,
                      lr=3.5e-4, milestones=[40, 70], warmup_epochs=10, workers=0, nformer_epochs=1,
                      nformer_steps=2, seq_len=64, nformer_batch=2, nformer_lr=1e-4, test_batch=32),
}


def _add_data_args(p):
    p.add_argument("--data", default="market1501",
                   help="market1501 | dukemtmcreid | msmt17 | cuhk03_labeled | cuhk03_detected | synthetic")
    p.add_argument("--root", default=None, help="dataset folder or its parent (synthetic: where to generate; "
                                                "default <out>/synthetic_market)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default 256 128)")
    p.add_argument("--workers", type=int, help="data loader workers")
    p.add_argument("--test-batch", type=int)


def _add_model_args(p):
    p.add_argument("--arch", help="resnet50 (default) | resnet18 | resnet34 | resnet101 | resnet152")
    p.add_argument("--feat-dim", type=int, default=256)
    p.add_argument("--pretrained", help="local torchvision ImageNet weights file (else random init)")
    p.add_argument("--nformer-depth", type=int, default=4)
    p.add_argument("--nformer-landmarks", type=int, default=5)
    p.add_argument("--nformer-topk", type=int, default=20)


def _add_run_args(p):
    p.add_argument("--out", default="runs/nformer_reid", help="output folder (checkpoints, logs, plots)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast on GPU (auto = bf16); CPU runs fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML file of option values")


def _add_eval_args(p):
    p.add_argument("--mode", default="official", choices=["official", "paper", "none"],
                   help="NFormer refinement: official (joint query+gallery), paper (query-query isolation), none")
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking (k1=20, k2=6, 0.3)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nformer-reid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train stage 1 (backbone) and/or stage 2 (NFormer)")
    _add_data_args(p), _add_model_args(p), _add_run_args(p)
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--weights", help="checkpoint to start from (e.g. stage 1 weights for --stage 2)")
    p.add_argument("--resume", help="resume a stage from its *_last.pth checkpoint")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop stage 1 after this many steps (smoke runs)")
    p.add_argument("--batch-size", type=int, help="P x K (default 64 = 16 x 4)")
    p.add_argument("--num-instances", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--milestones", type=int, nargs="+")
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--nformer-epochs", type=int)
    p.add_argument("--nformer-steps", type=int, help="total stage-2 steps (overrides --nformer-epochs)")
    p.add_argument("--seq-len", type=int, help="NFormer training sequence length (official 7000)")
    p.add_argument("--nformer-batch", type=int)
    p.add_argument("--nformer-lr", type=float)
    p.add_argument("--eval", action="store_true", help="evaluate at the end")
    _add_eval_args(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint (ours or the official nformer_model.pth)")
    _add_data_args(p), _add_run_args(p)
    p.add_argument("--weights", help="nformer-reid checkpoint")
    p.add_argument("--official", help="official NFormer release file nformer_model.pth")
    _add_eval_args(p)

    p = sub.add_parser("features", help="NFormer on precomputed features (e.g. dumped from torchreid or "
                                        "fast-reid): train it on --train and/or evaluate query/gallery")
    p.add_argument("--query", required=True, help=".pt (dict) or .npz file with feats (N,d), pids (N,), camids (N,)")
    p.add_argument("--gallery", required=True, help="same layout as --query")
    p.add_argument("--train", help="training features (feats, pids): train a new NFormer on them first")
    p.add_argument("--weights", help="an NFormer saved by 'nformer-reid features' (nformer.pth)")
    p.add_argument("--official", help="official NFormer release file nformer_model.pth (256-d features)")
    p.add_argument("--nformer-depth", type=int, default=4)
    p.add_argument("--nformer-landmarks", type=int, default=5)
    p.add_argument("--nformer-topk", type=int, default=20)
    p.add_argument("--nformer-steps", type=int, default=2000, help="training steps on --train")
    p.add_argument("--seq-len", type=int, default=7000, help="training sequence length (official 7000)")
    p.add_argument("--nformer-batch", type=int, default=2)
    p.add_argument("--nformer-lr", type=float, default=3e-4)
    _add_run_args(p)
    p.set_defaults(out="runs/nformer_features")
    p.add_argument("--mode", default="official", choices=["official", "paper"],
                   help="official (joint query+gallery sequence) or paper (query-query isolation)")
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking (k1=20, k2=6, 0.3)")

    p = sub.add_parser("demo", help="synthetic end-to-end NFormer demo (CPU, a few minutes)")
    p.add_argument("--out", default="nformer_demo_out")
    p.add_argument("--steps", type=int, default=100, help="NFormer training steps")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on a tiny benchmark")
    p.add_argument("--device", default="auto")
    p.add_argument("--config", help="YAML file of option values")

    p = sub.add_parser("datasets", help="print statistics of the datasets found under --root")
    p.add_argument("--root", required=True)
    p.add_argument("--name", help="only this dataset (synthetic: generate one at --root)")
    p.add_argument("--config", help="YAML file of option values")
    return parser


def _apply_config(parser, argv):
    """Re-parse with the YAML values as defaults, so explicit command-line options win."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    import yaml

    with open(args.config) as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"nformer-reid: {args.config} must hold a mapping of option names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = vars(args)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise SystemExit(f"nformer-reid: unknown option(s) in {args.config} for '{args.command}': {unknown}")
    sub = parser._subparsers._group_actions[0].choices[args.command]
    for action in sub._actions:  # YAML values skip argparse's checks: apply choices here
        if action.dest in values and action.choices is not None:
            value = str(values[action.dest]) if all(isinstance(c, str) for c in action.choices) else values[action.dest]
            if value not in action.choices:
                raise SystemExit(f"nformer-reid: {args.config}: {action.dest} must be one of "
                                 f"{list(action.choices)}, got {values[action.dest]!r}")
            values[action.dest] = value
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def _fill_recipe(args):
    recipe = RECIPES["synthetic" if args.data == "synthetic" else "default"]
    for key, value in recipe.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _load_dataset(args):
    from nformer_reid.data import Market1501, build_dataset, make_synthetic_market

    if args.data == "synthetic":
        root = args.root or os.path.join(args.out, "synthetic_market")
        make_synthetic_market(root, size=tuple(args.size), seed=args.seed)
        return Market1501(root)
    if not args.root:
        raise SystemExit("nformer-reid: --root is required for real datasets")
    return build_dataset(args.data, args.root)


def _evaluate(args, model, dataset, device):
    from nformer_reid.data.loader import build_test_loader
    from nformer_reid.engine import extract_features

    size = tuple(args.size)
    qf, q_pids, q_cams = extract_features(model.backbone, build_test_loader(dataset.query, size, args.test_batch,
                                                                            args.workers), args.flip, device, args.amp)
    gf, g_pids, g_cams = extract_features(model.backbone, build_test_loader(dataset.gallery, size, args.test_batch,
                                                                            args.workers), args.flip, device, args.amp)
    nformer = model.nformer if args.mode != "none" else None
    return _compare(args, nformer, qf, gf, (q_pids, g_pids, q_cams, g_cams), "backbone", dataset.name, device)[0]


def _compare(args, nformer, qf, gf, ids, baseline, title, device):
    """mAP/CMC of the `baseline` features and, unless nformer is None, of their NFormer refinement
    (args.mode), each also re-ranked with args.rerank; logs them, writes cmc.png and results.json
    under args.out. Returns (results, refined query, refined gallery)."""
    from nformer_reid.engine import evaluate_features, format_result, log, refine_features
    from nformer_reid.metrics import plot_cmc

    results = {baseline: evaluate_features(qf, gf, *ids)}
    if args.rerank:
        results[f"{baseline} + re-ranking"] = evaluate_features(qf, gf, *ids, rerank=True)
    qn = gn = None
    if nformer is not None:
        qn, gn = refine_features(nformer, qf, gf, args.mode, args.seed, device)
        results[f"NFormer ({args.mode})"] = evaluate_features(qn, gn, *ids)
        if args.rerank:
            results["NFormer + re-ranking"] = evaluate_features(qn, gn, *ids, rerank=True)
    log(f"results on {title} ({len(ids[0])} query / {len(ids[1])} gallery):")
    for name, res in results.items():
        log("  " + format_result(name, res))
    plot_cmc({k: (v["cmc"], v["mAP"]) for k, v in results.items()}, os.path.join(args.out, "cmc.png"),
             title=f"CMC, {title}")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({k: {m: v[m] for m in ("mAP", "R1", "R5", "R10")} for k, v in results.items()}, fh, indent=2)
    log(f"wrote {os.path.join(args.out, 'cmc.png')} and results.json")
    return results, qn, gn


def cmd_train(args):
    from nformer_reid.data.loader import build_test_loader, build_train_loader
    from nformer_reid.engine import (extract_features, load_checkpoint, log, plot_losses, resolve_device,
                                     save_checkpoint, set_log_file, train_backbone, train_nformer)
    from nformer_reid.model import ReIDModel

    args = _fill_recipe(args)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    set_log_file(os.path.join(args.out, "log.txt"))
    log(f"nformer-reid train {vars(args)}")
    device = resolve_device(args.device)
    dataset = _load_dataset(args)
    model = ReIDModel(dataset.num_train_pids, arch=args.arch, feat_dim=args.feat_dim, pretrained=args.pretrained,
                      nformer_depth=args.nformer_depth, nformer_landmarks=args.nformer_landmarks,
                      nformer_topk=args.nformer_topk)
    if args.weights:
        load_checkpoint(args.weights, model)
        log(f"loaded weights from {args.weights}")
    histories = {}
    size = tuple(args.size)
    if args.stage in ("1", "both"):
        loader = build_train_loader(dataset.train, size, args.batch_size, args.num_instances, args.workers, args.seed)
        histories["stage 1"] = train_backbone(
            model, loader, dataset.num_train_pids, out_dir=args.out, epochs=args.epochs, max_steps=args.max_steps,
            lr=args.lr, milestones=args.milestones, warmup_epochs=args.warmup_epochs, amp=args.amp, device=device,
            resume=args.resume if args.stage == "1" else None)
    if args.stage == "2" and not (args.weights or args.resume):
        log("warning: --stage 2 without --weights trains the NFormer on features of an untrained backbone")
    if args.stage in ("2", "both"):
        loader = build_test_loader(dataset.train, size, args.test_batch, args.workers)
        feats, pids, _ = extract_features(model.backbone, loader, False, device, args.amp)
        histories["stage 2"] = train_nformer(
            model, feats, pids, out_dir=args.out, epochs=args.nformer_epochs, steps=args.nformer_steps,
            seq_len=args.seq_len, batch_size=args.nformer_batch, lr=args.nformer_lr, amp=args.amp, device=device,
            seed=args.seed, resume=args.resume if args.stage == "2" else None)
    final = save_checkpoint(os.path.join(args.out, "model_final.pth"), model, stage=2 if args.stage != "1" else 1,
                            epoch=args.epochs)
    plot_losses(histories, os.path.join(args.out, "loss.png"))
    log(f"saved {final} and {os.path.join(args.out, 'loss.png')}")
    if args.eval:
        _evaluate(args, model, dataset, device)


def cmd_eval(args):
    from nformer_reid.engine import load_checkpoint, log, resolve_device, set_log_file
    from nformer_reid.model import ReIDModel, load_official_checkpoint

    if bool(args.weights) == bool(args.official):
        raise SystemExit("nformer-reid eval: give exactly one of --weights (ours) or --official (nformer_model.pth)")
    args = _fill_recipe(args)
    os.makedirs(args.out, exist_ok=True)
    set_log_file(os.path.join(args.out, "log.txt"))
    device = resolve_device(args.device)
    dataset = _load_dataset(args)
    if args.official:
        model = load_official_checkpoint(args.official)
        log(f"loaded the official release {args.official} (ResNet-50 without stem ReLU, as the official code)")
    else:
        state = torch.load(args.weights, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not state.get("config"):
            raise SystemExit(f"nformer-reid eval: {args.weights} is not an nformer-reid checkpoint")
        model = ReIDModel.from_config(state["config"])
        load_checkpoint(args.weights, model)
    _evaluate(args, model, dataset, device)


def cmd_features(args):
    import nformer_kernels as nk
    from nformer_reid.data import load_features
    from nformer_reid.engine import NFormerHolder, log, plot_losses, resolve_device, set_log_file, train_nformer

    if sum(bool(a) for a in (args.train, args.weights, args.official)) != 1:
        raise SystemExit("nformer-reid features: give exactly one of --train (train a new NFormer), --weights or "
                         "--official")
    os.makedirs(args.out, exist_ok=True)
    set_log_file(os.path.join(args.out, "log.txt"))
    device = resolve_device(args.device)
    try:
        query, gallery = load_features(args.query, "query"), load_features(args.gallery, "gallery")
        train = load_features(args.train, "train", need_camids=False) if args.train else None
    except (ValueError, OSError) as exc:
        raise SystemExit(f"nformer-reid features: {exc}") from None
    dim = query.feats.shape[1]
    if gallery.feats.shape[1] != dim:
        raise SystemExit(f"nformer-reid features: query features are {dim}-d, gallery {gallery.feats.shape[1]}-d")
    if args.official:
        nformer = nk.NFormer.from_official(torch.load(args.official, map_location="cpu", weights_only=False),
                                           num_landmarks=args.nformer_landmarks, topk=args.nformer_topk)
    elif args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "nformer_config" not in state:
            raise SystemExit(f"nformer-reid features: {args.weights} is not an NFormer saved by this command")
        nformer = nk.NFormer(**state["nformer_config"])
        nformer.load_state_dict(state["state_dict"])
    else:
        if train.feats.shape[1] != dim:
            raise SystemExit(f"nformer-reid features: train features are {train.feats.shape[1]}-d, query {dim}-d")
        labels = torch.unique(train.pids, return_inverse=True)[1]  # any pid values -> 0..C-1
        config = dict(dim=dim, depth=args.nformer_depth, num_landmarks=args.nformer_landmarks,
                      topk=args.nformer_topk, num_classes=int(labels.max()) + 1)
        nformer = nk.NFormer(**config)
        history = train_nformer(NFormerHolder(nformer, config), train.feats, labels, out_dir=args.out,
                                steps=args.nformer_steps, seq_len=args.seq_len, batch_size=args.nformer_batch,
                                lr=args.nformer_lr, amp=args.amp, device=device, seed=args.seed)
        plot_losses({"NFormer": history}, os.path.join(args.out, "loss.png"))
        path = os.path.join(args.out, "nformer.pth")
        torch.save({"nformer_config": config, "state_dict": nformer.state_dict()}, path)
        log(f"saved {path} (reuse it with --weights)")
    if nformer.dim != dim:
        raise SystemExit(f"nformer-reid features: the NFormer is {nformer.dim}-d but the features are {dim}-d")
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    results, qn, gn = _compare(args, nformer, query.feats, gallery.feats, ids, "input features",
                               f"{dim}-d precomputed features", device)
    torch.save({"query": qn, "gallery": gn}, os.path.join(args.out, "refined_features.pt"))
    log(f"wrote {os.path.join(args.out, 'refined_features.pt')}")
    return results


def cmd_demo(args):
    from nformer_reid.demo import run_demo

    run_demo(args.out, steps=args.steps, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
             rerank=not args.no_rerank, device=None if args.device == "auto" else args.device, quick=args.quick)


def cmd_datasets(args):
    from nformer_reid.data import DATASETS, DatasetLayoutError, Market1501, build_dataset, make_synthetic_market

    if args.name == "synthetic":
        make_synthetic_market(args.root)
        Market1501(args.root)
        return
    names = [args.name] if args.name else list(DATASETS)
    found = 0
    for name in names:
        try:
            build_dataset(name, args.root)
            found += 1
        except DatasetLayoutError as exc:
            if args.name:
                raise SystemExit(f"nformer-reid: {exc}")
    if not found:
        raise SystemExit(f"nformer-reid: no known dataset layout under {args.root!r} "
                         f"(looked for {', '.join(DATASETS)}); try --name <dataset> for the expected layout")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = _apply_config(parser, sys.argv[1:] if argv is None else argv)
    {"train": cmd_train, "eval": cmd_eval, "features": cmd_features, "demo": cmd_demo,
     "datasets": cmd_datasets}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
