"""Backbone init from our classification checkpoints: dense round trip, exact LBC masks, B*W dense start, errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from mmdet.models.backbones import ResNet
from torch import nn

import lbc
from lbc.detection.backbone import OWN, convert, describe, load_backbone, save_backbone
from lbc.errors import ConfigError
from lbc.sparsity.nm import NMPattern, topn_mask
from tests.helpers import ROOT

LBC = {"pattern": "2:4", "t_i": 0, "t_f": 1}


class StandIn(nn.Module):
    """What SparseDetector offers load_backbone: ``.detector.backbone`` (mmdet's ResNet) and ``.sparsity``."""

    def __init__(self, method: str = "dense", depth: int = 18, exclude: tuple[str, ...] = (), **options: Any) -> None:
        super().__init__()
        self.detector = nn.Module()
        self.detector.backbone = ResNet(depth=depth)
        self.detector.neck = nn.Conv2d(512 if depth < 50 else 2048, 16, 1)
        globs = ["neck", "backbone.conv1", *exclude]
        self.sparsity = lbc.sparsify(self.detector, method, input_size="first_forward", exclude=globs, **options)


def classification(method: str, epoch: float, **options: Any) -> tuple[nn.Module, Any]:
    """A torchvision ResNet-18 with ``method`` attached as the classification trainer does, put at ``epoch``."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # BN statistics that are not the identity, so that the round trip tests them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    sp = lbc.sparsify(model, method, **options)
    with torch.no_grad():
        for s in sp.score_parameters():
            s.normal_()
    sp.update(epoch)
    return model.eval(), sp


def write_checkpoint(model: nn.Module, sp: Any, path: Path) -> Path:
    """What lbc.engine.trainer writes, the entries convert reads: model, sparsity state, config."""
    torch.save({"model": model.state_dict(), "sparsity": sp.state_dict(), "epoch": 2,
                "config": {"sparsity": {"method": sp.name, **LBC}}}, path)
    return path


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model, sp = classification("dense", 0)
    return model, write_checkpoint(model, sp, tmp_path_factory.mktemp("dense") / "last.pt")


@pytest.fixture(scope="module")
def lbc_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any, Path]:
    model, sp = classification("lbc", 1, **LBC)  # after t_f: one candidate left in every group
    assert sp.removed == 5 and sp.is_exact_nm()
    return model, sp, write_checkpoint(model, sp, tmp_path_factory.mktemp("lbc") / "last.pt")


def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision ResNet's layer1..layer4 outputs (what mmdet's ResNet returns with out_indices 0..3)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(x)
    return out


def assert_same_features(model: nn.Module, det: StandIn) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    backbone = det.detector.backbone
    backbone.eval()  # mmdet's ResNet.train() returns None: no chaining
    with torch.no_grad():
        expected, got = features(model, x), backbone(x)
    assert len(got) == 4
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_dense_round_trip_gives_the_classification_feature_maps(dense_ckpt, tmp_path):
    model, ckpt = dense_ckpt
    payload = convert(ckpt.parent)  # the run dir: its last.pt
    assert payload["meta"]["method"] == "dense" and payload["meta"]["depth"] == 18 and not payload["meta"]["layers"]
    assert not any(k.startswith("fc.") for k in payload["tensors"])
    out = save_backbone(payload, tmp_path / "bb.safetensors")
    det = StandIn("dense")
    assert load_backbone(det, out) == {"masks_kept": False, "layers": [], "state_carried": False}
    assert_same_features(model, det)


def test_both_file_formats_hold_the_same_payload(lbc_ckpt, tmp_path):
    _, _, ckpt = lbc_ckpt
    payload = convert(ckpt)
    a, b = (convert(save_backbone(payload, tmp_path / f"bb{suffix}")) for suffix in (".safetensors", ".pt"))
    for read in (a, b):
        assert read["meta"] == payload["meta"] and read["tensors"].keys() == payload["tensors"].keys()
        for k, v in payload["tensors"].items():
            assert read["tensors"][k].dtype == v.dtype and torch.equal(read["tensors"][k], v), k


def test_lbc_after_t_f_keeps_every_mask_and_removes_nothing_later(lbc_ckpt, tmp_path):
    model, sp_cls, ckpt = lbc_ckpt
    out = save_backbone(convert(ckpt), tmp_path / "bb.safetensors")
    det = StandIn("lbc", pattern="2:4", t_i=0, t_f=4)  # the detector's own schedule, still removing at epoch 2
    result = load_backbone(det, out)
    assert result["masks_kept"] and result["state_carried"] and len(result["layers"]) == len(sp_cls.layers)
    sp = det.sparsity
    cls_state = model.state_dict()

    def check() -> None:
        bb = det.detector.backbone.state_dict()
        for layer in sp_cls.layers:
            for name in ("mask", "alive", "scores"):
                assert torch.equal(bb[f"{layer}{OWN}{name}"], cls_state[f"{layer}{OWN}{name}"]), (layer, name)
        assert sp.removed == 5 and sp.is_exact_nm()

    check()
    assert not any(s.requires_grad for s in sp.score_parameters())  # final: the scores no longer learn
    for epoch in (0, 2, 3.5, 10):  # before, inside and after the detector's t_f: nothing is removed again
        sp.update(epoch)
        check()
    sp.finalize()
    assert sp.report()["scalars"]["exact_nm"] == 1.0
    assert_same_features(model, det)  # the sparse backbone computes what the classification model did


def test_another_method_or_dense_starts_from_the_masked_weights(lbc_ckpt, tmp_path, caplog):
    model, sp_cls, ckpt = lbc_ckpt
    out = save_backbone(convert(ckpt), tmp_path / "bb.safetensors")
    cls_state = model.state_dict()
    for method, options in (("dense", {}), ("srste", {"pattern": "2:4"}), ("lbc", {**LBC, "pattern": "1:4"})):
        det = StandIn(method, **options)
        with caplog.at_level(logging.WARNING, logger="lbc.detection.backbone"):
            caplog.clear()
            assert not load_backbone(det, out)["masks_kept"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "masks not kept" in lines[0] and str(out) in lines[0], lines
        bb = det.detector.backbone.state_dict()
        for layer in sp_cls.layers:
            masked = cls_state[f"{layer}.weight"] * cls_state[f"{layer}{OWN}mask"].float()
            assert torch.equal(bb[f"{layer}.weight"], masked), (method, layer)
        assert torch.equal(bb["conv1.weight"], cls_state["conv1.weight"])  # the dense stem as it was
    assert_same_features(model, det)  # B*W (dense start) computes the classification features too


def test_same_method_with_other_sparse_layers_keeps_masks_but_not_the_schedule(lbc_ckpt, tmp_path, caplog):
    model, sp_cls, ckpt = lbc_ckpt
    det = StandIn("lbc", exclude=("backbone.layer4",), **LBC)
    with caplog.at_level(logging.WARNING, logger="lbc.detection.backbone"):
        result = load_backbone(det, ckpt)  # a classification checkpoint directly: converted on the fly
    assert result["masks_kept"] and not result["state_carried"] and "starts fresh" in caplog.text
    bb, cls_state = det.detector.backbone.state_dict(), model.state_dict()
    assert torch.equal(bb["layer3.0.conv1" + OWN + "mask"], cls_state["layer3.0.conv1" + OWN + "mask"])
    masked = cls_state["layer4.0.conv1.weight"] * cls_state["layer4.0.conv1" + OWN + "mask"].float()
    assert torch.equal(bb["layer4.0.conv1.weight"], masked)  # dense in the detector: B*W
    det.sparsity.update(1)  # the detector's schedule: final layers stay as they are
    assert torch.equal(bb["layer3.0.conv1" + OWN + "mask"], cls_state["layer3.0.conv1" + OWN + "mask"])


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_corrupt_truncated_and_foreign_files_are_one_line_errors(lbc_ckpt, tmp_path):
    _, _, ckpt = lbc_ckpt
    good = save_backbone(convert(ckpt), tmp_path / "good.safetensors")
    cases = {
        "corrupt.pt": b"\x00not a checkpoint" * 64,
        "corrupt.safetensors": b"\xff" * 512,
        "truncated.pt": ckpt.read_bytes()[: ckpt.stat().st_size // 2],
        "truncated.safetensors": good.read_bytes()[: good.stat().st_size // 2],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for call in (lambda p: convert(p), lambda p: load_backbone(StandIn("dense"), p)):
            with pytest.raises(ConfigError) as err:
                call(path)
            one_line_naming(err, path)
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError) as err:
        convert(tmp_path / "foreign.pt")
    assert "no ResNet backbone" in one_line_naming(err, tmp_path / "foreign.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError) as err:
        convert(tmp_path / "list.pt")
    one_line_naming(err, tmp_path / "list.pt")
    with pytest.raises(ConfigError) as err:
        convert(tmp_path / "absent.pt")
    one_line_naming(err, tmp_path / "absent.pt")


def test_depth_mismatch_and_missing_keys_are_one_line_errors(dense_ckpt, tmp_path):
    model, ckpt = dense_ckpt
    with pytest.raises(ConfigError) as err:
        load_backbone(StandIn("dense", depth=50), ckpt)
    assert "ResNet-18" in one_line_naming(err, ckpt) and "ResNet-50" in str(err.value)
    state = {k: v for k, v in model.state_dict().items() if k != "layer4.1.bn2.running_var"}
    torch.save(state, tmp_path / "plain.pt")  # a plain state dict, one statistic short
    det = StandIn("dense")
    before = det.detector.backbone.conv1.weight.clone()
    with pytest.raises(ConfigError) as err:
        load_backbone(det, tmp_path / "plain.pt")
    assert "missing" in one_line_naming(err, tmp_path / "plain.pt") and "layer4.1.bn2.running_var" in str(err.value)
    assert torch.equal(det.detector.backbone.conv1.weight, before)  # nothing loaded


def test_a_kept_layer_without_its_scores_is_a_one_line_error(lbc_ckpt, tmp_path):
    _, _, ckpt = lbc_ckpt
    payload = convert(ckpt)
    del payload["tensors"]["layer2.0.conv1" + OWN + "scores"]
    path = save_backbone(payload, tmp_path / "no_scores.safetensors")
    det = StandIn("lbc", **LBC)
    with pytest.raises(ConfigError) as err:
        load_backbone(det, path)
    assert "'layer2.0.conv1'" in one_line_naming(err, path) and "'scores'" in str(err.value)
    assert det.detector.backbone.layer2[0].conv1.parametrizations.weight[0].mask.all()  # nothing loaded
    assert not load_backbone(StandIn("dense"), path)["masks_kept"]  # B*W needs only the masks


def test_convert_tool_prints_what_it_wrote_and_fails_in_one_line(lbc_ckpt, tmp_path):
    _, _, ckpt = lbc_ckpt
    spec = importlib.util.spec_from_file_location("convert_backbone", ROOT / "tools" / "convert_backbone.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tool.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    code, out, err = run(str(ckpt), "--out", str(tmp_path / "bb.safetensors"))
    assert code == 0 and "sparse lbc 2:4 (19 masked layers, removed 5)" in out and "ResNet-18" in out, (out, err)
    assert describe(convert(tmp_path / "bb.safetensors")) in out
    code, out, err = run(str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and not out
    assert not (tmp_path / "x.safetensors").exists()


# --- what each method carries: its own hooks (SparsityMethod.carried_state / carried_mask / carry_in) ---------
def test_asp_pruned_source_is_not_pruned_again_by_the_detector(tmp_path, caplog):
    model, sp_cls = classification("asp", 0, pattern="2:4", dense_epochs=0)  # pruned at update(0)
    assert sp_cls.pruned
    ckpt = write_checkpoint(model, sp_cls, tmp_path / "last.pt")
    payload = convert(ckpt)
    assert payload["meta"]["state"]["pruned"] is True and "pruned True" in describe(payload)
    det = StandIn("asp", pattern="2:4", dense_epochs=3)  # the detector's own dense phase: 3 epochs
    with caplog.at_level(logging.INFO, logger="lbc.detection.backbone"):
        result = load_backbone(det, ckpt)
    assert result["masks_kept"] and result["state_carried"] and "pruned True" in caplog.text
    sp, cls_state = det.sparsity, model.state_dict()
    assert sp.pruned and sp.epoch == 0.0 and sp.flops.timeline[-1] == (0.0, sp.step_cost())
    with torch.no_grad():  # the detector's weights move: a second prune would choose other masks
        for layer in sp_cls.layers:
            det.detector.backbone.get_submodule(layer).parametrizations.weight.original.normal_()
    for epoch in (0, 3, 5):
        sp.update(epoch)
    bb = det.detector.backbone.state_dict()
    for layer in sp_cls.layers:
        assert torch.equal(bb[f"{layer}{OWN}mask"], cls_state[f"{layer}{OWN}mask"]), layer


def test_srste_source_carries_the_top_n_of_its_weights_not_the_stale_buffer(tmp_path):
    model, sp_cls = classification("srste", 0, pattern="2:4")
    layer = next(iter(sp_cls.layers))
    with torch.no_grad():  # an optimizer step after the last training forward: the buffer is stale
        model.get_submodule(layer).parametrizations.weight.original.normal_()
    ckpt = write_checkpoint(model, sp_cls, tmp_path / "last.pt")
    stale = model.state_dict()[f"{layer}{OWN}mask"]
    payload = convert(ckpt)
    weight = payload["tensors"][f"{layer}.weight"]
    assert torch.equal(payload["tensors"][f"{layer}{OWN}mask"], topn_mask(weight, NMPattern(2, 4)))
    assert not torch.equal(payload["tensors"][f"{layer}{OWN}mask"], stale)
    result = load_backbone(StandIn("srste", pattern="2:4"), save_backbone(payload, tmp_path / "bb.safetensors"))
    assert result["masks_kept"] and result["state_carried"]


def test_a_sparse_method_state_without_masks_is_a_one_line_error(dense_ckpt, tmp_path):
    model, _ = dense_ckpt
    for method in ("lbc", "a-method-of-another-lbc"):  # registered, or unknown here: both should hold masks
        path = tmp_path / f"{method}.pt"
        torch.save({"model": model.state_dict(), "sparsity": {"method": method, "pattern": "2:4"}}, path)
        with pytest.raises(ConfigError, match="names method .* but the model holds no masks") as err:
            convert(path)
        one_line_naming(err, path)
