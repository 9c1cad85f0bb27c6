"""A method never reports "done" for a model that is not what the pattern promises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.models import build_model


def small() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_small", num_classes=10)


@pytest.mark.parametrize("method", ["lbc", "srste", "asp", "dense"])
def test_a_pattern_no_layer_can_take_is_an_error(method):
    options = {"t_f": 1} if method == "lbc" else {}
    with pytest.raises(ConfigError, match=r"sparsity.pattern=2:3: no Conv2d/Linear layer .* can be 2:3"):
        lbc.sparsify(small(), method=method, pattern="2:3", **options)


def test_restoring_weights_without_the_method_state_never_empties_a_group():
    trained = small()
    sp = lbc.sparsify(trained, method="lbc", pattern="2:4", t_f=2)
    sp.update(2)  # one candidate left in every group
    assert sp.is_exact_nm()
    state = trained.state_dict()

    fresh = small()
    again = lbc.sparsify(fresh, method="lbc", pattern="2:4", t_f=2)
    fresh.load_state_dict(state)  # alive sets restored, the schedule's count (sp.state_dict) not
    again.update(2)  # asks for 5 more removals per group, where only one candidate is alive
    report = again.report()["scalars"]
    assert report["exact_nm"] == 1.0 and report["alive_per_group"] == 1.0
    assert report["density"] == pytest.approx(sp.report()["scalars"]["density"])
    again.finalize()


def test_finalize_refuses_an_emptied_group():
    model = small()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_f=1)
    sp.update(1)
    state = next(iter(sp.layers.values())).parametrizations.weight[0]
    with torch.no_grad():
        state.mask[0].zero_()  # "at most N" still holds; exactly N does not
    assert not sp.is_exact_nm()
    with pytest.raises(RuntimeError, match="not exactly 2:4"):
        sp.finalize()


def test_update_after_detach_says_so():
    sp = lbc.sparsify(small(), method="lbc", pattern="2:4", t_f=2)
    sp.detach()
    with pytest.raises(RuntimeError, match="update\\(\\) after detach\\(\\)"):
        sp.update(1)
