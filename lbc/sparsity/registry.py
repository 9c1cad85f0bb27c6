"""The registry of sparsity methods: its names are the values of ``sparsity.method``.

A method is declared once, where it is written::

    @METHODS.register(options=LBCOptions)   # registered as LBCOptions' `method` default, "lbc"
    class LBC(SparsityMethod): ...

A method without options of its own takes the common ones (:class:`SparsityOptions`: ``pattern``,
``exclude``, ``strict``) and is registered by name: ``@METHODS.register("mine")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lbc.registry import Registry
from lbc.sparsity.options import SparsityOptions


class MethodRegistry(Registry[Any]):
    """A :class:`~lbc.registry.Registry` of method classes, each with its options dataclass."""

    def register(
        self, name: str | None = None, *, options: type[SparsityOptions] | None = None
    ) -> Callable[[Any], Any]:
        """Class decorator: register under ``options``' ``method`` default (or ``name``, for a method
        without an options dataclass) and set the class's ``name`` and ``Options``."""
        if (name is None) == (options is None):
            raise TypeError("METHODS.register: give options= (its `method` default names the method) "
                            "or, for a method without an options dataclass, a name")
        if options is not None:
            name = next(f.default for f in dataclasses.fields(options) if f.name == "method")
            if not isinstance(name, str):
                raise TypeError(f"METHODS.register: {options.__name__}.method needs the method's name as its default")

        def deco(cls: Any) -> Any:
            cls.name, cls.Options = name, options or SparsityOptions
            return super(MethodRegistry, self).register(name)(cls)

        return deco

    def schemas(self) -> dict[str, type[SparsityOptions]]:
        """``{method: options dataclass}`` of the methods that have one: the ``sparsity`` config group's schemas."""
        return {n: self.get(n).Options for n in self.names() if self.get(n).Options is not SparsityOptions}


METHODS = MethodRegistry("sparsity method")
