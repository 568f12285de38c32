"""Name registries with metadata.

Every pluggable piece (pipeline stages, and later merge methods, optimizers,
routers, quantizers) is registered by name where it is defined. A registry
refuses duplicate names, and looking up an unknown name is an error that lists
the known names and suggests the nearest one. Entries carry metadata (a short
summary, the paper, declared parameters) from which the CLI and docs are made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from expertkit.errors import ExpertkitError, unknown

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object and its metadata."""

    name: str
    obj: T
    summary: str = ""
    paper: str = ""
    params: Any = None  # usually a pydantic model class declaring parameters
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> object registry that refuses duplicates."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, **meta: Any) -> T:
        """Register ``obj`` under ``name``; a second registration of a name is an error."""
        if name in self._entries:
            raise ExpertkitError(f"{self.kind} '{name}' is registered twice; names must be unique.")
        known = {"summary", "paper", "params"}
        self._entries[name] = Entry(
            name, obj, **{k: v for k, v in meta.items() if k in known},
            extra={k: v for k, v in meta.items() if k not in known},
        )
        return obj

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            return self.add(name, obj, **meta)

        return deco

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name``; unknown names raise with a suggestion."""
        try:
            return self._entries[name]
        except KeyError:
            raise unknown(self.kind, name, self._entries) from None

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        return self.entry(name).obj

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
