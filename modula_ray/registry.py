"""One generic registry, shared by methods and data sources: ``register``, ``get`` and ``names``.

``get`` of an unknown name raises ``ConfigError`` naming the field, the closest known
names ("did you mean ...") and every registered name.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping

from .errors import ConfigError


class Registry(Mapping):
    """``{name: class}``; ``key_attr`` is the class attribute that holds each entry's name."""

    def __init__(self, kind: str, key_attr: str):
        self.kind, self.key_attr = kind, key_attr
        self._entries: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: adds ``cls`` under ``getattr(cls, key_attr)``; a name is registered once."""
        name = getattr(cls, self.key_attr, None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} must set a non-empty {self.key_attr!r} to be a registered {self.kind}")
        if name in self._entries and self._entries[name] is not cls:
            raise TypeError(f"{self.kind} {name!r} is registered twice ({self._entries[name].__name__}, "
                            f"{cls.__name__})")
        self._entries[name] = cls
        return cls

    def get(self, name, default=None, *, field: str | None = None):
        """The entry called ``name``; unknown names raise ``ConfigError`` (``default`` is not used)."""
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(field or self.kind, f"unknown {self.kind} {name!r}; {hint}known: {self.names()}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __getitem__(self, name: str) -> type:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
