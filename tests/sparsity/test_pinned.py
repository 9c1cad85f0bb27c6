"""Every method's masks, outputs and gradients, bit for bit as pinned in ``pinned/golden.safetensors``.

The maths of lbc/sparsity was checked against the authors' released code, the SR-STE reference and
apex ASP; ``pinned/make_pinned.py`` recorded what that code computes on fixed, exactly
representable data. A refactor must reproduce it exactly (``torch.equal``, not a tolerance).
Never regenerate the golden file to make this pass.
"""

import json

import pytest
import torch
from safetensors import safe_open

from tests.sparsity.pinned.make_pinned import GOLDEN, SCENARIOS, compute


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_the_golden_file_holds_exactly_the_scenarios(golden):
    tensors, meta = golden
    names = {key.rsplit("/", 1)[0] for key in tensors}
    assert all(any(n == s or n.startswith(s + "/") for s in SCENARIOS) for n in names)
    assert all(any(k.startswith(s + "/") for k in tensors) for s in SCENARIOS)  # none without pins
    assert len(tensors) > 800 and len(meta) > 20


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_is_bit_identical(name, golden):
    tensors, meta = golden
    got, got_meta = compute(name)
    prefix = name + "/"
    expected = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key
    expected_meta = {k: v for k, v in meta.items() if k.startswith(prefix)}
    assert got_meta.keys() == expected_meta.keys()
    for key, value in expected_meta.items():
        assert json.loads(got_meta[key]) == json.loads(value), key
