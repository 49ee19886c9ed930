"""from_torchreid / from_fastreid on stand-ins with the attributes of torchreid's Engine and data
managers and of fast-reid's models and test loaders (neither package is installed): the features
are the model's in eval mode, the labels come from the batches, and the results round-trip
through the feature files NFormer's CLI reads."""
import types

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from nformer_reid.data import load_query_gallery, save_query_gallery
from nformer_reid.interop import extract_fastreid, extract_torchreid, from_fastreid, from_torchreid


class TinyReID(torch.nn.Module):
    """A Re-ID network as torchreid builds them: (logits, features) in training, features in eval."""

    def __init__(self, dim=6, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc = torch.nn.Linear(8, dim)
        self.classifier = torch.nn.Linear(dim, classes)
        self.bn.running_mean.uniform_(-0.5, 0.5)  # eval and training BatchNorm differ

    def forward(self, x):
        v = self.fc(self.bn(torch.relu(self.conv(x)).mean((2, 3)) * torch.arange(1, 9.0)))
        return (self.classifier(v), v) if self.training else v


class Images(Dataset):
    """n random images with labels; torchreid items {'img', 'pid', 'camid', 'impath'}, fast-reid
    items {'images', 'targets', 'camids', 'img_paths'}."""

    def __init__(self, n, seed, style="torchreid", labels=True):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 8, generator=g) * (255 if style == "fastreid" else 1)
        self.pids = torch.randint(1, 20, (n,), generator=g)
        self.camids = torch.randint(0, 6, (n,), generator=g)
        self.style, self.labels = style, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.style == "fastreid":
            item = {"images": self.images[i].clone(), "img_paths": f"{i:04d}.jpg"}
            return {**item, "targets": int(self.pids[i]), "camids": int(self.camids[i])} if self.labels else item
        item = {"img": self.images[i].clone(), "impath": f"{i:04d}.jpg", "dsetid": 0}
        return {**item, "pid": int(self.pids[i]), "camid": int(self.camids[i])} if self.labels else item


def loader(dataset, batch_size=3):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class DataManager:
    """What torchreid's ImageDataManager exposes to an engine."""

    def __init__(self, targets=("market1501",), labels=True):
        self.sources, self.targets = ["market1501"], list(targets)
        self.sets = {name: {"query": Images(5, 2 * i, labels=labels), "gallery": Images(8, 2 * i + 1, labels=labels)}
                     for i, name in enumerate(targets)}
        self.test_loader = {name: {k: loader(v) for k, v in sets.items()} for name, sets in self.sets.items()}
        self.train_loader = None


class Engine:
    """torchreid.engine.Engine's evaluation surface: datamanager, model, test_loader,
    parse_data_for_eval and extract_features."""

    def __init__(self, datamanager, model):
        self.datamanager, self.model = datamanager, model
        self.test_loader, self.train_loader = datamanager.test_loader, datamanager.train_loader

    def parse_data_for_eval(self, data):
        return data["img"], data["pid"], data["camid"]

    def extract_features(self, input):
        return self.model(input)


def reference(model, images, flip=False, normalize=False):
    model.eval()
    with torch.no_grad():
        out = model(images)
        if flip:
            out = (out + model(images.flip(-1))) / 2
    model.train()
    return torch.nn.functional.normalize(out, dim=1) if normalize else out


# ------------------------------------------------------------------------------------------ torchreid
@pytest.mark.parametrize("flip,normalize", [(False, False), (True, False), (False, True)])
def test_from_torchreid_engine(flip, normalize):
    model, dm = TinyReID(), DataManager()
    model.train()  # as a training run leaves it
    query, gallery = from_torchreid(Engine(dm, model), flip=flip, normalize=normalize)
    assert model.training and all(m.training for m in model.modules())  # the mode is given back
    for fs, data in ((query, dm.sets["market1501"]["query"]), (gallery, dm.sets["market1501"]["gallery"])):
        want = reference(model, data.images, flip, normalize)
        assert fs.feats.shape == want.shape and torch.allclose(fs.feats, want, atol=1e-6)
        assert torch.equal(fs.pids, data.pids) and torch.equal(fs.camids, data.camids)
    if normalize:
        assert torch.allclose(query.feats.norm(dim=1), torch.ones(5))
    if flip:  # the mirrored images do change the features: the flag is not a no-op
        assert not torch.allclose(query.feats, reference(model, dm.sets["market1501"]["query"].images), atol=1e-4)


def test_from_torchreid_uses_the_engines_own_parse_and_extract():
    """A video engine pools its model's features over the frames in extract_features; custom engines
    may parse batches their way: from_torchreid goes through both, as Engine.test does."""
    model, dm = TinyReID(), DataManager()

    class Doubling(Engine):
        def parse_data_for_eval(self, data):
            return data["img"], data["pid"] + 100, data["camid"]

        def extract_features(self, input):
            return 2 * self.model(input)

    query, _ = from_torchreid(Doubling(dm, model))
    data = dm.sets["market1501"]["query"]
    assert torch.allclose(query.feats, 2 * reference(model, data.images), atol=1e-6)
    assert torch.equal(query.pids, data.pids + 100)
    other = TinyReID(dim=4)  # an explicit model replaces the engine's (and its extract_features)
    query, _ = from_torchreid(Doubling(dm, model), other)
    assert torch.allclose(query.feats, reference(other, data.images), atol=1e-6)


def test_from_torchreid_data_manager_and_loader_dict():
    model, dm = TinyReID(), DataManager(targets=("market1501", "dukemtmcreid"))
    query, gallery = from_torchreid(dm, model, dataset_name="dukemtmcreid")
    data = dm.sets["dukemtmcreid"]["gallery"]
    assert torch.allclose(gallery.feats, reference(model, data.images), atol=1e-6)
    assert torch.equal(gallery.camids, data.camids)
    q2, _ = from_torchreid(dm.test_loader, model, dataset_name="dukemtmcreid")
    assert torch.equal(q2.feats, query.feats)
    with pytest.raises(ValueError, match=r"dataset_name: the test loaders hold \['market1501', 'dukemtmcreid'\]"):
        from_torchreid(dm, model)
    with pytest.raises(ValueError, match="dataset_name 'viper' is not one of"):
        from_torchreid(dm, model, dataset_name="viper")
    with pytest.raises(TypeError, match="model is needed: a torchreid data manager holds no model"):
        from_torchreid(dm, dataset_name="market1501")
    with pytest.raises(TypeError, match=r"source must be a torchreid Engine or data manager \(with a .test_loader"):
        from_torchreid(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        from_torchreid(dm, lambda x: x, dataset_name="market1501")


def test_extract_torchreid_old_tuple_batches_unlabelled_sets_and_bad_output():
    model = TinyReID()
    data = Images(7, 3)
    tuples = DataLoader(list(zip(data.images, data.pids, data.camids, [f"{i}.jpg" for i in range(7)])), batch_size=2)
    fs = extract_torchreid(model, tuples)
    assert torch.allclose(fs.feats, reference(model, data.images), atol=1e-6) and torch.equal(fs.pids, data.pids)
    unlabelled = extract_torchreid(model, loader(Images(4, 1, labels=False)))
    assert unlabelled.pids is None and unlabelled.camids is None and unlabelled.feats.shape == (4, 6)
    mixed = [next(iter(loader(Images(3, 1)))), next(iter(loader(Images(3, 1, labels=False))))]
    with pytest.raises(ValueError, match="loader: some batches have pids and some do not"):
        extract_torchreid(model, mixed)
    with pytest.raises(ValueError, match=r"loader: a torchreid batch is a dict with 'img', 'pid', 'camid', got the "
                                         r"keys \['camids', 'images', 'img_paths', 'targets'\]"):
        extract_torchreid(model, loader(Images(4, 1, style="fastreid")))
    # an Engine's own parser on unlabelled batches
    with pytest.raises(ValueError, match="market1501 query: a batch has no key 'pid'"):
        from_torchreid(Engine(DataManager(labels=False), model))

    class Logits(torch.nn.Module):  # a model that returns its training outputs in eval mode too
        def forward(self, x):
            return x.mean((2, 3)), x.mean((1, 2, 3))

    with pytest.raises(TypeError, match=r"the model returned a tuple, expected a \(batch, d\) feature tensor"):
        extract_torchreid(Logits(), loader(data))

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(ValueError, match=r"loader: feats contain NaN or Inf \(7 rows, first row 0\)"):
        extract_torchreid(Broken(), loader(data))
    with pytest.raises(ValueError, match="loader: the loader yielded no batches"):
        extract_torchreid(model, [])
    with pytest.raises(ValueError, match="device 'gpu7' is not a device"):
        extract_torchreid(model, loader(data), device="gpu7")


# ------------------------------------------------------------------------------------------- fast-reid
class FastReIDModel(torch.nn.Module):
    """A fast-reid meta-architecture: forward(batched_inputs) moves batch["images"] to its device
    and normalises them in place (Baseline.preprocess_image), then returns (batch, d) features in
    eval mode, a loss dict in training."""

    def __init__(self):
        super().__init__()
        self.net = TinyReID()
        self.register_buffer("pixel_mean", torch.tensor([120.0, 110.0, 100.0]).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([60.0, 58.0, 57.0]).view(1, -1, 1, 1))

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = batched_inputs["images"].to(self.device)
        images.sub_(self.pixel_mean).div_(self.pixel_std)
        if self.training:
            return {"loss_cls": self.net.train()(images)[0].sum()}
        return self.net.eval()(images)


def fastreid_reference(model, images, flip):
    net = model.net.eval()
    with torch.no_grad():
        x = (images - model.pixel_mean) / model.pixel_std
        out = net(x)
        return (out + net(x.flip(-1))) / 2 if flip else out


@pytest.mark.parametrize("flip", [False, True])
def test_from_fastreid(flip):
    model = FastReIDModel()
    data = Images(11, 4, style="fastreid")
    cfg = types.SimpleNamespace(TEST=types.SimpleNamespace(FLIP=types.SimpleNamespace(ENABLED=flip)))
    query, gallery = from_fastreid(model, loader(data, 4), 4, cfg=cfg)  # build_test_loader's (loader, num_query)
    assert model.training  # given back as it came
    want = fastreid_reference(model, data.images, flip)
    assert torch.allclose(torch.cat([query.feats, gallery.feats]), want, atol=1e-5)
    assert torch.equal(query.pids, data.pids[:4]) and torch.equal(gallery.pids, data.pids[4:])
    assert torch.equal(query.camids, data.camids[:4]) and torch.equal(gallery.camids, data.camids[4:])
    q2, g2 = from_fastreid(model, (loader(data, 5), 4), flip=flip)  # the pair as one argument
    assert torch.allclose(q2.feats, query.feats, atol=1e-6) and torch.equal(g2.pids, gallery.pids)


def test_from_fastreid_checks():
    model = FastReIDModel()
    data = Images(6, 5, style="fastreid")
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match=rf"num_query must be in 1..5 \(the loader yielded 6 images\), got {bad}"):
            from_fastreid(model, loader(data), bad)
    with pytest.raises(TypeError, match=r"num_query must be an int \(build_test_loader returns"):
        from_fastreid(model, loader(data))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        from_fastreid("model_final.pth", loader(data), 3)
    with pytest.raises(TypeError, match=r"cfg has no TEST.FLIP.ENABLED \(a fast-reid CfgNode has\), got dict"):
        from_fastreid(model, loader(data), 3, cfg={"TEST": {}})
    with pytest.raises(ValueError, match=r"test loader: a fast-reid batch is a dict with 'images', 'targets', "
                                         r"'camids', got \['camid', 'dsetid', 'img', 'impath', 'pid'\]"):
        from_fastreid(model, loader(Images(6, 5)), 3)
    unlabelled = extract_fastreid(model, loader(Images(6, 5, style="fastreid", labels=False)), normalize=True)
    assert unlabelled.pids is None and torch.allclose(unlabelled.feats.norm(dim=1), torch.ones(6))


# ---------------------------------------------------------------------------------- into NFormer's files
def test_extracted_features_round_trip_through_the_query_gallery_file(tmp_path):
    query, gallery = from_torchreid(Engine(DataManager(), TinyReID()))
    path = save_query_gallery(str(tmp_path / "market_osnet.pt"), query, gallery)
    q, g = load_query_gallery(path)
    for a, b in ((q, query), (g, gallery)):
        assert torch.equal(a.feats, b.feats) and torch.equal(a.pids, b.pids) and torch.equal(a.camids, b.camids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_fastreid_with_a_cuda_model_and_prefetched_batches():
    """fast-reid's DataLoaderX moves every tensor of a batch to the GPU: features and labels come
    back as CPU tensors all the same."""
    model = FastReIDModel().cuda()
    data = Images(7, 6, style="fastreid")

    def prefetched():
        for batch in loader(data):
            yield {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    query, gallery = from_fastreid(model, list(prefetched()), 3, flip=True)
    assert query.feats.device.type == query.pids.device.type == gallery.camids.device.type == "cpu"
    want = fastreid_reference(model.cpu(), data.images, True)
    assert torch.allclose(torch.cat([query.feats, gallery.feats]), want, rtol=1e-2, atol=1e-2)  # TF32 convolutions
    assert torch.equal(gallery.pids, data.pids[3:])
