"""A flat name -> builder registry, as in torchvision's ``models/_api.py``: duplicates raise."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lbc.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (the command-line vocabulary) to builders of one kind of thing."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        """The entry called ``name``; a ConfigError naming ``key`` and the choices otherwise."""
        if name not in self._entries:
            where = f"{key}={name!r}" if key else repr(name)
            raise ConfigError(f"{where} is not a known {self.kind}; choose from: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
