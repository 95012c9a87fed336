"""A small name -> factory registry that refuses duplicates and suggests close matches on a miss."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry", "suggest"]

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a " Did you mean ...?" hint for ``name`` among ``choices`` (empty when nothing is close).

    Case is ignored when comparing (``"MNIST"`` suggests ``"mnist"``); the choices are shown as spelled.
    """
    by_lower: dict[str, list[str]] = {}
    for choice in sorted(choices):
        by_lower.setdefault(choice.lower(), []).append(choice)
    lowered = difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=0.5)
    close = [choice for low in lowered for choice in by_lower[low]][:3]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Maps names to factories.

    Args:
        kind: What the registry holds, used in error messages (e.g. ``"gate"``).

    Examples:
        >>> reg = Registry("gate")
        >>> @reg.register("mine")
        ... class Mine: ...
        >>> reg.get("mine") is Mine
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under ``name``; raises on a duplicate name."""

        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; an unknown name raises with the close matches."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{suggest(name, list(self._items))} Known: {known}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
