"""torch.compile traces the methods' reparametrisations in one graph and computes what eager does."""

import pytest
import torch
from torch import nn

import lbc


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("lbc", {"t_f": 4}), ("srste", {})])
def test_compiled_step_matches_eager(method, options):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(64, 8))
        sp = lbc.sparsify(model, method=method, pattern="2:4", exclude=[], **options)
        sp.update(1)
        run = torch.compile(model, fullgraph=True) if compiled else model  # fullgraph: no graph break
        run(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    eager, traced = grads
    assert eager.keys() == traced.keys() and any("scores" in n for n in eager) == (method == "lbc")
    for name in eager:
        torch.testing.assert_close(traced[name], eager[name], rtol=1e-4, atol=1e-6)
