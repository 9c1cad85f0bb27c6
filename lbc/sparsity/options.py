"""Each sparsity method's options as a dataclass: names, types, defaults and range checks in one place.

These are the ``sparsity`` config group's schemas (``lbc.config`` puts them in Hydra's ConfigStore,
so OmegaConf rejects an unknown key or a wrong type while composing) and what ``lbc.sparsify``
checks its keywords against before it builds a method, so the command line and the Python API
accept and refuse the same values. Plain dataclasses: nothing here imports Hydra.

A method's constructor takes the same keywords (``tests/sparsity/test_options.py`` keeps them equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lbc.errors import ConfigError, is_number, require


@dataclass
class SparsityOptions:
    """Options every method takes: the pattern and which Conv2d/Linear layers it applies to."""

    method: str = "dense"
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


@dataclass
class DenseOptions(SparsityOptions):
    """The dense reference row: nothing is masked."""

    method: str = "dense"


@dataclass
class LBCOptions(SparsityOptions):
    """LBC (paper Sec. 3.3, Alg. 1): gradual removal of candidates on Eq. 6 between ``t_i`` and ``t_f``."""

    method: str = "lbc"
    t_i: float = 0.0  # first epoch of candidate removal (paper: 0)
    t_f: float | None = None  # last epoch (required; paper: half the training epochs)
    exponent: int = 3  # Eq. 6's exponent (released DeiT recipe: 4)
    rounding: str = "paper"  # paper: ceil in Eq. 6 | released: one fewer at some epochs
    update_every: str = "epoch"  # epoch (Alg. 1) | step: Eq. 6 at fractional epochs
    score_init: Any = "paper"  # paper: 1 | released: 1/C(M-1,N-1) | a number
    score_weight_decay: float | None = None  # None: the optimizer's weight decay (as released)
    criterion: str = "score"  # Table 6: score | score_inverse | magnitude | gradient
    removal: str = "paper"  # paper: removal is final (alive set) | released: signed-score top-k every step

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.t_f is not None, "sparsity.t_f", self.t_f,
                "lbc needs t_f, the epoch by which one candidate is left (the paper uses half the epochs)")
        require(is_number(self.t_i) and self.t_i >= 0, "sparsity.t_i", self.t_i, "use a number >= 0")
        require(is_number(self.t_f) and self.t_f >= self.t_i, "sparsity.t_f", self.t_f,
                f"use a number >= sparsity.t_i={self.t_i}")
        require(isinstance(self.exponent, int) and not isinstance(self.exponent, bool) and 1 <= self.exponent <= 16,
                "sparsity.exponent", self.exponent, "use an integer from 1 to 16 (paper: 3; released DeiT: 4)")
        require(self.rounding in ("paper", "released"), "sparsity.rounding", self.rounding, "choose from: paper, released")
        require(self.update_every in ("epoch", "step"), "sparsity.update_every", self.update_every,
                "choose from: epoch, step")
        require(self.score_init in ("paper", "released") or is_number(self.score_init), "sparsity.score_init",
                self.score_init, "use paper (1), released (1/C(M-1,N-1)) or a number")
        require(self.score_weight_decay is None or is_number(self.score_weight_decay) and self.score_weight_decay >= 0,
                "sparsity.score_weight_decay", self.score_weight_decay, "use a number >= 0 or null")
        require(self.criterion in ("score", "score_inverse", "magnitude", "gradient"), "sparsity.criterion",
                self.criterion, "choose from: score, score_inverse, magnitude, gradient")
        require(self.removal in ("paper", "released"), "sparsity.removal", self.removal, "choose from: paper, released")
        require(self.removal == "paper" or self.criterion == "score", "sparsity.removal", self.removal,
                f"removal=released re-selects by the learned scores; criterion={self.criterion} needs removal=paper")


@dataclass
class SRSTEOptions(SparsityOptions):
    """SR-STE: top-N magnitude mask every forward, dense gradient plus ``lambda_w * (1 - mask) * W``."""

    method: str = "srste"
    lambda_w: float = 2e-4  # the sparse-refined decay (SR-STE paper: 2e-4)
    t_i: float | None = None  # gradual schedule (LBC Table 5): kept per group from M to N on Eq. 6 ...
    t_f: float | None = None  # ... between t_i and t_f; both null: N:M from the first step (SR-STE paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        require((self.t_i is None) == (self.t_f is None), "sparsity.t_f", self.t_f,
                f"give both sparsity.t_i and sparsity.t_f for SR-STE's gradual schedule, or neither (t_i={self.t_i})")
        if self.t_i is not None:
            require(is_number(self.t_i) and self.t_i >= 0, "sparsity.t_i", self.t_i, "use a number >= 0")
            require(is_number(self.t_f) and self.t_f >= self.t_i, "sparsity.t_f", self.t_f,
                    f"use a number >= sparsity.t_i={self.t_i}")
        require(is_number(self.lambda_w) and self.lambda_w >= 0, "sparsity.lambda_w", self.lambda_w,
                "use a number >= 0 (paper: 2e-4)")


@dataclass
class ASPOptions(SparsityOptions):
    """ASP (apex): dense for ``dense_epochs``, one-shot magnitude prune, masked fine-tuning."""

    method: str = "asp"
    dense_epochs: int = 0  # dense phase; the prune happens at this epoch (0: at the first step)
    finetune_epochs: float | None = None  # masked fine-tuning; None: the rest of the schedule
    prune_classifier: bool = False  # apex: true (also prunes the classifier)
    apex_dims: bool = False  # apex: true (skip layers with out % 8 or in % 16 != 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.dense_epochs, int) and not isinstance(self.dense_epochs, bool)
                and self.dense_epochs >= 0, "sparsity.dense_epochs", self.dense_epochs,
                "use a whole number of epochs >= 0 (dense.pt is written at an epoch's end)")
        require(self.finetune_epochs is None or is_number(self.finetune_epochs) and self.finetune_epochs > 0,
                "sparsity.finetune_epochs", self.finetune_epochs, "use a number of epochs > 0 or null (the rest)")
        for key in ("prune_classifier", "apex_dims"):
            require(isinstance(getattr(self, key), bool), f"sparsity.{key}", getattr(self, key), "use true or false")


OPTIONS: dict[str, type[SparsityOptions]] = {
    "dense": DenseOptions,
    "lbc": LBCOptions,
    "srste": SRSTEOptions,
    "asp": ASPOptions,
}


def option_names(method: str) -> list[str]:
    """The keys ``sparsity.<key>`` that ``method`` accepts (its dataclass fields)."""
    return [f.name for f in dataclasses.fields(OPTIONS[method])]


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Checked keywords for ``method``: unknown keys and bad values are one-line ConfigErrors.

    Returns the options with defaults filled in, minus ``method``.
    """
    if method not in OPTIONS:
        raise ConfigError(f"sparsity.method={method!r} is not a known sparsity method; choose from: "
                          f"{', '.join(sorted(OPTIONS))}")
    allowed = option_names(method)
    for key in options:
        if key not in allowed:
            raise ConfigError(f"sparsity.{key} is not an option of method {method!r}; allowed: "
                              f"{', '.join(sorted(k for k in allowed if k != 'method'))}")
    checked = OPTIONS[method](**{**options, "method": method})
    return {f.name: getattr(checked, f.name) for f in dataclasses.fields(checked) if f.name != "method"}
