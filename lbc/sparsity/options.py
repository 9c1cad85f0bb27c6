"""The options every method takes (:class:`SparsityOptions`) and the one check of a method's keywords.

A method's own options are a dataclass beside it (``LBCOptions`` in ``lbc.py``, ...) that extends
:class:`SparsityOptions` and is registered with it (``@METHODS.register(options=LBCOptions)``); its
``method`` default is the method's name. Each rule is checked once, in the dataclass's
``__post_init__``, and the method's constructor takes the checked object. These dataclasses are the
``sparsity`` config group's schemas (``METHODS.schemas()``; ``lbc.config`` stores them in Hydra's
ConfigStore, so OmegaConf refuses an unknown key or a wrong type while composing) and what
``lbc.sparsify`` checks its keywords against, so the command line and the Python API accept and
refuse the same values. Plain dataclasses: nothing here imports Hydra or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from lbc.errors import ConfigError, require

Opts = TypeVar("Opts", bound="SparsityOptions")

# The one-shot criteria a method may start from (``sparsity.prior``; the methods of the same names in
# ``lbc.sparsity.oneshot`` prune with them): N largest |w|, Wanda's |w| * ||x||, SparseGPT's OBS saliency.
PRIORS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class SparsityOptions:
    """Options every method takes: the pattern and which Conv2d/Linear layers it applies to.

    A method registered without a dataclass of its own takes exactly these.
    """

    method: str  # the method's name (sparsity.method): each method's dataclass gives it as the default
    pattern: str = "2:4"  # "N:M", 1 <= N < M
    exclude: Any = None  # module-name globs kept dense (a list, or one glob); None: the stem and the classifier
    strict: bool = False  # a selected layer that cannot be N:M is an error instead of a dense layer

    def __post_init__(self) -> None:
        from lbc.sparsity.nm import parse_pattern  # local: nm imports torch, options stay light to read

        parse_pattern(self.pattern)  # one-line ConfigError naming sparsity.pattern
        if isinstance(self.exclude, str):  # one glob, not a sequence of one-character globs
            self.exclude = [self.exclude]
        elif self.exclude is not None and not isinstance(self.exclude, (list, tuple)):
            self.exclude = list(self.exclude) if hasattr(self.exclude, "__iter__") else self.exclude
        require(self.exclude is None or isinstance(self.exclude, list) and all(isinstance(g, str) for g in self.exclude),
                "sparsity.exclude", self.exclude, "use a module-name glob, a list of them, or null")
        require(isinstance(self.strict, bool), "sparsity.strict", self.strict, "use true or false")


def check_options(schema: type[Opts], method: str, keywords: Mapping[str, Any]) -> Opts:
    """``keywords`` of ``method`` as its checked ``schema`` object, defaults filled in.

    An unknown key or a bad value is a one-line ConfigError naming ``sparsity.<key>``.
    """
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in keywords:
        if key not in allowed:
            raise ConfigError(f"sparsity.{key} is not an option of method {method!r}; allowed: "
                              f"{', '.join(sorted(k for k in allowed if k != 'method'))}")
    return schema(**{**keywords, "method": method})
