"""--knn-precision: every command that builds or refines with an NFormer takes it (default auto), it
reaches the NFormer's neighbour search and re-ranking's nk.knn, and a bad value is a one-line user error."""
import pytest

import nformer_kernels as nk
from nformer_reid.cli import main, parse_config
from nformer_reid.config import COMMANDS
from nformer_reid.engine.checkpoints import load_model, save_checkpoint
from tests.test_reid_cli import _feature_files, user_error

NFORMER_COMMANDS = ("train", "eval", "features", "refine", "rerank", "demo")
REQUIRED = {"features": ["--query", "q.pt", "--gallery", "g.pt"],
            "refine": ["--input", "i.npy", "--output", "o.npy", "--official", "o.pth"], "rerank": ["--features", "qg.pt"]}


def test_commands_with_an_nformer_take_the_option_default_auto():
    for command in NFORMER_COMMANDS:
        assert parse_config([command, *REQUIRED.get(command, [])]).knn_precision == "auto", command
        cfg = parse_config([command, *REQUIRED.get(command, []), "--knn-precision", "exact"])
        assert cfg.knn_precision == "exact", command
    assert "knn_precision" not in COMMANDS["datasets"].__dataclass_fields__


@pytest.mark.parametrize("command", NFORMER_COMMANDS)
def test_bad_value_is_one_line_naming_the_option(capsys, command):
    err = user_error(capsys, [command, *REQUIRED.get(command, []), "--knn-precision", "fast"], "--knn-precision")
    assert "fast" in err


def test_yaml_value_is_checked(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("knn_precision: fp16\n")
    user_error(capsys, ["demo", "--config", str(cfg)], r"knn_precision must be one of \['auto', 'exact', 'certified'\]")


@pytest.fixture
def knn_calls(monkeypatch):
    """The precision of every nk.knn call (the NFormer's, through nformer_kernels.ops, and the app's)."""
    calls = []
    real = nk.ops.knn

    def spy(*args, **kwargs):
        calls.append(kwargs.get("precision", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(nk.ops, "knn", spy)
    monkeypatch.setattr(nk, "knn", spy)
    return calls


@pytest.mark.parametrize("precision", ["certified", "exact"])
def test_features_flag_reaches_the_nformer_and_re_ranking(tmp_path, knn_calls, precision, monkeypatch):
    import nformer_reid.engine.evaluation as evaluation

    rerank_precisions = []
    real_rerank = evaluation.re_ranking_sparse

    def rerank_spy(*args, **kwargs):
        rerank_precisions.append(kwargs.get("knn_precision"))
        return real_rerank(*args, **kwargs)

    monkeypatch.setattr(evaluation, "re_ranking_sparse", rerank_spy)
    paths = _feature_files(tmp_path, "pt")
    rc = main(["features", "--query", paths["query"], "--gallery", paths["gallery"], "--train", paths["train"],
               "--device", "cpu", "--amp", "none", "--nformer-depth", "1", "--nformer-steps", "2", "--seq-len", "32",
               "--rerank", "--knn-precision", precision, "--out", str(tmp_path / "run")])
    assert rc == 0
    # the two training steps and the refinement (NFormer); re-ranking of the input and refined features
    # takes it too (its "exact" search is its own, "certified" goes through nk.knn)
    assert len(knn_calls) >= 3 and set(knn_calls) == {precision}, knn_calls
    assert rerank_precisions == [precision, precision]
    # not stored: a reloaded NFormer takes this run's setting
    loaded = load_model(str(tmp_path / "run" / "nformer.pth"), "NFormer", knn_precision="exact")
    assert loaded.knn_precision == "exact"
    assert load_model(str(tmp_path / "run" / "nformer.pth"), "NFormer").knn_precision == "auto"


def test_demo_default_is_auto(tmp_path, knn_calls):
    assert main(["demo", "--quick", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "demo")]) == 0
    assert knn_calls and set(knn_calls) == {"auto"}, knn_calls


def test_reid_model_passes_it_to_its_nformer_and_keeps_it_out_of_the_config(tmp_path):
    from nformer_reid.model import ReIDModel

    model = ReIDModel(7, arch="resnet18", feat_dim=16, nformer_depth=1, knn_precision="certified", verbose=False)
    assert model.nformer.knn_precision == "certified"
    assert "knn_precision" not in model.config
    assert ReIDModel.from_config(model.config).nformer.knn_precision == "auto"
    path = save_checkpoint(str(tmp_path / "m.pth"), model, stage=1, epoch=0, config=model.config)
    assert load_model(path, "ReIDModel", knn_precision="exact").nformer.knn_precision == "exact"
    with pytest.raises(ValueError, match="knn_precision"):
        ReIDModel(7, arch="resnet18", feat_dim=16, knn_precision="fast", verbose=False)
