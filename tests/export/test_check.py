"""lbc-check: accepts a valid 2:4 export, rejects one violating group naming its layer, agrees with training's
grouping and layer selection, and turns bad files into one line."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from lbc.cli.check import main
from lbc.export import check_layer, check_weights
from lbc.models import build_model
from lbc.sparsity import select_layers
from lbc.sparsity.nm import NMPattern, is_nm, topn_mask

LAYER = "layers.1.0.conv2"  # 32 x 32 x 3 x 3: 2304 groups of 4


def break_one_group(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``weights`` where one group of LAYER has a third non-zero (grouped as training groups)."""
    out = dict(weights)
    w = weights[f"{LAYER}.weight"].clone()
    group = w[5, 8:12, 1, 2]  # output 5, kernel position (1, 2), input channels 8..11: one group
    assert int((group != 0).sum()) == 2
    w[5, 8 + int((group == 0).nonzero()[0]), 1, 2] = 0.5
    out[f"{LAYER}.weight"] = w
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_accepts_a_valid_export_and_names_the_one_broken_group(lbc_export, tmp_path, capsys):
    assert main([str(lbc_export / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "ok: all 14 eligible layers are 2:4" in out and f"{LAYER} " in out and "excluded by 'conv1'" in out

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(lbc_export / "config.yaml", bad / "config.yaml")
    save_file(break_one_group(load_file(lbc_export / "model.safetensors")), bad / "model.safetensors")
    assert main([str(bad / "model.safetensors")]) == 1
    err = one_line_error(capsys)
    assert f"1 of 14 eligible layers are not 2:4: {LAYER} (1 of 2304 groups" in err

    # the same file as a torch state dict, with the model named on the command line / read from the shapes
    torch.save(break_one_group(load_file(lbc_export / "model.safetensors")), tmp_path / "bad.pt")
    for extra in (["--model", "resnet_small"], []):
        assert main([str(tmp_path / "bad.pt"), "--pattern", "2:4", *extra, "--quiet"]) == 1
        assert f"{LAYER} (1 of 2304 groups" in one_line_error(capsys)
    torch.save({"model": load_file(lbc_export / "model.safetensors")}, tmp_path / "good.pt")
    assert main([str(tmp_path / "good.pt"), "--model", "resnet_small", "--quiet"]) == 0


def test_a_dense_state_dict_names_every_eligible_layer(tmp_path, capsys):
    torch.save(build_model("resnet_small", num_classes=10).state_dict(), tmp_path / "dense.pt")
    assert main([str(tmp_path / "dense.pt"), "--pattern", "2:4", "--model", "resnet_small"]) == 1
    err = one_line_error(capsys)
    assert "14 of 14 eligible layers are not 2:4" in err and "layers.2.1.conv2 (" in err
    assert ": conv1 (" not in err and ", conv1 (" not in err and "fc (" not in err  # stem and classifier may be dense
    # a pattern none of whose M divides the input dimensions: nothing is eligible, said in one line
    assert main([str(tmp_path / "dense.pt"), "--pattern", "1:128", "--model", "resnet_small"]) == 1
    assert "no layer is eligible" in one_line_error(capsys)


def test_grouping_and_selection_are_trainings():
    pattern = NMPattern(2, 4)
    g = torch.Generator().manual_seed(0)
    for shape in [(8, 16, 3, 3), (12, 8), (6, 4, 1, 1)]:
        w = torch.randn(shape, generator=g)
        sparse = w * topn_mask(w, pattern)
        assert check_layer("x", sparse, pattern, True).nm and is_nm(sparse, pattern)
        sparse.view(-1)[torch.randint(sparse.numel(), (3,), generator=g)] = 1.0  # may break a group or not
        assert check_layer("x", sparse, pattern, True).nm == is_nm(sparse, pattern)
    # four non-zeros down one input channel (along the outputs) are fine; four along the inputs are not
    w = torch.zeros(4, 8)
    w[:, 0] = 1.0
    assert check_layer("x", w, pattern, True).violating == 0
    assert check_layer("x", torch.ones(1, 4), pattern, True).violating == 1

    model = torchvision.models.resnet50(num_classes=10)
    checks = check_weights(model.state_dict(), "2:4", model)
    assert {c.name for c in checks if c.required} == set(select_layers(model, "2:4").layers)
    small = build_model("resnet_small", num_classes=10)
    reasons = {c.name: c.reason for c in check_weights(small.state_dict(), "1:32", small)}
    assert reasons["layers.0.0.conv1"] == "input dimension 16 is not divisible by M=32" and reasons["layers.2.0.conv2"] == ""


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    good = build_model("resnet_small", num_classes=10).state_dict()
    save_file(good, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    files = {
        "missing.safetensors": None,
        "truncated.safetensors": data[: len(data) // 3],
        "garbage.safetensors": b"\x00\x10" * 500,
        "empty.pt": b"",
        "notes.txt": b"hello\n",
        "truncated.pt": None,
        "object.pt": pickle.dumps(Path("x"), protocol=2),
        "not_weights.pt": None,
    }
    torch.save(good, tmp_path / "full.pt")
    full = (tmp_path / "full.pt").read_bytes()
    files["truncated.pt"] = full[: len(full) // 2]
    torch.save({"epochs": 3, "note": "no tensors"}, tmp_path / "not_weights.pt")
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        assert main([str(tmp_path / name)]) == 2, name
        assert "WEIGHTS=" in one_line_error(capsys), name
    torch.save(good, tmp_path / "r18.pt")  # a real state dict of another model than --model says
    assert main([str(tmp_path / "r18.pt"), "--model", "resnet18"]) == 2
    assert "not of this model" in one_line_error(capsys)
    assert main([str(tmp_path / "good.safetensors"), "--pattern", "4:4"]) == 2
    one_line_error(capsys)


@pytest.mark.slow
def test_a_training_checkpoint_is_refused_with_the_way_out(trained, capsys):
    assert main([str(trained("srste") / "last.pt")]) == 2
    assert "lbc-export" in one_line_error(capsys)
