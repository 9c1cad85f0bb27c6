"""``lbc-summary``: a per-layer table, a JSON last line, and one line with exit status 2 for a bad value."""

from __future__ import annotations

import json

from lbc.cli.summary import main


def test_prints_a_table_and_a_json_last_line(capsys):
    args = ["--model", "resnet_small", "--num-classes", "10", "--image-size", "32", "--pattern"]
    assert main([*args, "1:4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    totals = json.loads(lines[-1])
    assert totals["pattern"] == "1:4" and totals["params_nonzero"] < totals["params_total"]
    assert any(line.startswith("conv1 ") and "excluded" in line for line in lines)

    assert main([*args, "4:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "sparsity.pattern" in err


def test_any_timm_name_by_prefix_with_builder_options(capsys):
    vit = ["--model", "timm/deit_tiny_patch16_224", "--image-size", "32", "--pattern", "2:4"]
    assert main([*vit, "--model-option", "img_size=32", "--model-option", "depth=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    totals = json.loads(out[-1])
    assert totals["input_size"] == [3, 32, 32] and totals["params_nonzero"] < totals["params_total"]
    assert sum(line.startswith("blocks.") for line in out) == 2 * 4  # depth 2: qkv, proj, fc1, fc2 each

    assert main(vit) == 2  # built for 224 px: one line that says what to pass
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-option img_size=32" in err
