"""lbc: N:M fine-grained sparse training (LBC, SR-STE, ASP, dense) on any ``nn.Module``.

>>> import lbc
>>> sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=60)
>>> lbc.accelerate(exported_model, dtype=torch.float16)  # 2:4 weights on sparse tensor cores (CUDA, sm80+)
"""

# lbc.accelerate is the function (it shadows the submodule's name: import helpers from lbc.accelerate)
from lbc.accelerate import accelerate
from lbc.engine.optim import param_groups
from lbc.sparsity import METHODS, NMPattern, SparsityMethod, parse_pattern, sparsify

__version__ = "0.1.0"
__all__ = ["METHODS", "accelerate", "NMPattern", "SparsityMethod", "param_groups", "parse_pattern", "sparsify", "__version__"]
