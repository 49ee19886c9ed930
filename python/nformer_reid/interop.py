"""Features straight from a torchreid or fast-reid model, as FeatureSets NFormer can refine.

Neither package is imported: the functions use the attributes their objects have.

torchreid (KaiyangZhou/deep-person-reid): an Engine holds .model, .datamanager and .test_loader,
a dict {dataset name: {"query": DataLoader, "gallery": DataLoader}} (an ImageDataManager /
VideoDataManager holds the same .test_loader). Batches are dicts with "img", "pid", "camid" (and
"impath"); the engine reads them with parse_data_for_eval, feeds the images to
extract_features (model(imgs); the video engine pools over frames) in eval mode under no_grad,
and can L2-normalise the features (test(normalize_feature=True)).

fast-reid (JDAI-CV/fast-reid): DefaultTrainer.build_test_loader(cfg, name) (=
fastreid.data.build_reid_test_loader) returns (loader, num_query): one loader over the query
images, then the gallery images. Batches are dicts with "images", "targets" (the pids),
"camids" and "img_paths"; the model, in eval mode, takes the whole batch dict (it moves and
normalises the images itself) and returns a (batch, d) feature tensor. cfg.TEST.FLIP.ENABLED
averages the features of the image and its horizontal mirror.
"""
import contextlib
from collections.abc import Mapping
from typing import Callable, Optional, Tuple

import torch

from nformer_reid.data.features import FeatureSet
from nformer_reid.utils.checks import as_device
from nformer_reid.utils.logging import progress

__all__ = ["extract_fastreid", "extract_torchreid", "from_fastreid", "from_torchreid"]


def _model_device(model) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """model in eval mode, gradients off; its train / eval flags are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _features(out, batch_size: int, where: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: the model returned a {type(out).__name__}, expected a (batch, d) feature tensor "
                        "(in eval mode torchreid and fast-reid models return the features alone)")
    if out.dim() != 2 or out.shape[0] != batch_size:
        raise ValueError(f"{where}: the model returned shape {tuple(out.shape)} for a batch of {batch_size} images, "
                         "expected (batch, d) features")
    return out.detach().float().cpu()


def _labels(parts, key: str, where: str) -> Optional[torch.Tensor]:
    present = [p is not None for p in parts]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"{where}: some batches have {key} and some do not")
    try:
        # fast-reid's DataLoaderX prefetches every tensor of a batch to the GPU: labels come back to the CPU
        return torch.cat([torch.as_tensor(p).reshape(-1).cpu() for p in parts])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{where}: {key} of the batches are not integer tensors ({exc})") from None


def _extract(loader, parse: Callable, forward: Callable, model, device, flip: bool, normalize: bool,
             where: str) -> FeatureSet:
    """Run `forward` over the batches `parse` splits into (images, pids, camids, model input)."""
    if not isinstance(flip, bool) or not isinstance(normalize, bool):
        raise TypeError(f"flip and normalize must be bools, got {flip!r} and {normalize!r}")
    device = _model_device(model) if device is None else as_device(device)
    feats, pids, camids = [], [], []
    with _eval_mode(model):
        for batch in progress(loader, f"features of {where}"):
            try:
                images, pid, camid, feed = parse(batch)
            except KeyError as exc:  # an Engine's parse_data_for_eval indexes the batch
                raise ValueError(f"{where}: a batch has no key {exc}") from None
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            if not isinstance(images, torch.Tensor):
                raise TypeError(f"{where}: a batch's images are a {type(images).__name__}, expected a tensor")
            mirrored = images.flip(-1) if flip else None  # a copy, taken before a model may normalise in place
            out = _features(forward(feed(images.to(device))), images.shape[0], where)
            if flip:
                out = (out + _features(forward(feed(mirrored.to(device))), images.shape[0], where)) / 2
            feats.append(out)
            pids.append(pid)
            camids.append(camid)
    if not feats:
        raise ValueError(f"{where}: the loader yielded no batches")
    feats = torch.cat(feats)
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    try:
        return FeatureSet(feats, _labels(pids, "pids", where), _labels(camids, "camids", where))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------- torchreid
def _torchreid_batch(batch):
    """(images, pids, camids) of a torchreid batch: a dict with img / pid / camid (torchreid >= 1.0)
    or a tuple (imgs, pids, camids, ...) (earlier versions)."""
    if isinstance(batch, Mapping):
        if "img" not in batch:
            raise ValueError(f"a torchreid batch is a dict with 'img', 'pid', 'camid', got the keys {sorted(batch)}")
        return batch["img"], batch.get("pid"), batch.get("camid")
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(f"a torchreid batch is a dict with 'img', 'pid', 'camid' or a tuple (imgs, pids, camids, ...), "
                    f"got a {type(batch).__name__}")


def extract_torchreid(model, loader, *, device=None, flip: bool = False, normalize: bool = False,
                      parse: Optional[Callable] = None, forward: Optional[Callable] = None,
                      where: str = "loader") -> FeatureSet:
    """The FeatureSet of one torchreid DataLoader (e.g. datamanager.test_loader[name]["query"]):
    model(imgs) in eval mode under no_grad, as torchreid's engine runs it (the model's train / eval
    flags are restored afterwards). Images go to `device` (default: the model's). flip averages the
    features of each image and its horizontal mirror; normalize L2-normalises them (torchreid's
    normalize_feature). parse(batch) -> (imgs, pids, camids) and forward(imgs) -> features replace
    the defaults (an Engine's parse_data_for_eval and extract_features). Labels are None when the
    batches have none. TypeError / ValueError naming `where` for an unexpected batch or output."""
    parse = parse or _torchreid_batch
    forward = forward or model

    def split(batch):
        images, pids, camids = parse(batch)
        return images, pids, camids, lambda imgs: imgs

    return _extract(loader, split, forward, model, device, flip, normalize, where)


def from_torchreid(source, model=None, *, dataset_name: Optional[str] = None, device=None, flip: bool = False,
                   normalize: bool = False) -> Tuple[FeatureSet, FeatureSet]:
    """(query, gallery) FeatureSets of a torchreid test set.

    source: an Engine (its .model and its own parse_data_for_eval / extract_features are used), an
    ImageDataManager / VideoDataManager (then pass `model`), or their .test_loader dict.
    model: overrides the engine's model. dataset_name: a key of test_loader (the targets);
    needed when there are several. device, flip, normalize: as in `extract_torchreid`
    (normalize=True is test(normalize_feature=True)). Labels (pids, camids) come from the batches."""
    test_loader = source if isinstance(source, Mapping) else getattr(source, "test_loader", None)
    if not isinstance(test_loader, Mapping):
        raise TypeError("source must be a torchreid Engine or data manager (with a .test_loader dict) or that dict, "
                        f"got {type(source).__name__}")
    names = list(test_loader)
    if dataset_name is None:
        if len(names) != 1:
            raise ValueError(f"dataset_name: the test loaders hold {names}; choose one")
        dataset_name = names[0]
    if dataset_name not in test_loader:
        raise ValueError(f"dataset_name {dataset_name!r} is not one of the test loaders {names}")
    loaders = test_loader[dataset_name]
    if not isinstance(loaders, Mapping) or any(loaders.get(k) is None for k in ("query", "gallery")):
        raise ValueError(f"test_loader[{dataset_name!r}] must hold 'query' and 'gallery' loaders")
    own_model = getattr(source, "model", None)
    if model is None and own_model is None:
        raise TypeError("model is needed: a torchreid data manager holds no model (pass model=, or the Engine)")
    parse = getattr(source, "parse_data_for_eval", None)
    forward = getattr(source, "extract_features", None) if model is None else None
    model = model if model is not None else own_model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return tuple(extract_torchreid(model, loaders[split], device=device, flip=flip, normalize=normalize,
                                   parse=parse if callable(parse) else None,
                                   forward=forward if callable(forward) else None,
                                   where=f"{dataset_name} {split}") for split in ("query", "gallery"))


# -------------------------------------------------------------------------------------------- fast-reid
def extract_fastreid(model, loader, *, device=None, flip: bool = False, normalize: bool = False,
                     where: str = "loader") -> FeatureSet:
    """The FeatureSet of every image of a fast-reid loader (query and gallery together, in order):
    model(batch) in eval mode under no_grad with batch["images"] on `device` (default: the
    model's), as fast-reid's inference_on_dataset runs it; pids from "targets", camids from
    "camids" (None when the batches have none). flip averages with the mirrored images
    (cfg.TEST.FLIP.ENABLED); normalize L2-normalises the features."""
    def split(batch):
        if not isinstance(batch, Mapping) or "images" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a fast-reid batch is a dict with 'images', 'targets', 'camids', got {keys}")
        return batch["images"], batch.get("targets"), batch.get("camids"), lambda imgs: {**batch, "images": imgs}

    return _extract(loader, split, model, model, device, flip, normalize, where)


def from_fastreid(model, loader, num_query: Optional[int] = None, *, cfg=None, device=None,
                  flip: Optional[bool] = None, normalize: bool = False) -> Tuple[FeatureSet, FeatureSet]:
    """(query, gallery) FeatureSets of a fast-reid test set.

    model: the fast-reid model (DefaultTrainer.build_model(cfg) with its weights loaded, e.g. by
    Checkpointer(model).load(cfg.MODEL.WEIGHTS)); fast-reid builds models from a cfg with its own
    registry, so the model, not the cfg, is what is passed. loader, num_query: what
    DefaultTrainer.build_test_loader(cfg, dataset_name) returns, as two arguments or as that one
    (loader, num_query) pair: the first num_query images are the query. cfg (optional): flip
    defaults to cfg.TEST.FLIP.ENABLED (else False). device, normalize: as in `extract_fastreid`."""
    if num_query is None and isinstance(loader, tuple) and len(loader) == 2:
        loader, num_query = loader
    if isinstance(num_query, bool) or not isinstance(num_query, int):
        raise TypeError(f"num_query must be an int (build_test_loader returns (loader, num_query)), got "
                        f"{type(num_query).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if flip is None and cfg is not None:
        try:
            flip = bool(cfg.TEST.FLIP.ENABLED)
        except AttributeError:
            raise TypeError(f"cfg has no TEST.FLIP.ENABLED (a fast-reid CfgNode has), got "
                            f"{type(cfg).__name__}") from None
    everything = extract_fastreid(model, loader, device=device, flip=bool(flip), normalize=normalize,
                                  where="test loader")
    n = everything.feats.shape[0]
    if not 1 <= num_query < n:
        raise ValueError(f"num_query must be in 1..{n - 1} (the loader yielded {n} images), got {num_query}")

    def rows(part):
        return FeatureSet._from_checked(*(None if t is None else t[part] for t in
                                          (everything.feats, everything.pids, everything.camids)))

    return rows(slice(0, num_query)), rows(slice(num_query, n))
