"""Name -> class registries (backbones, objectives, losses, labelers, heads, meta methods).

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("simclr")
    class SimCLR: ...

    OBJECTIVES.get("simclr")       # -> SimCLR
    OBJECTIVES.get("simclrr")      # UserError: unknown objective 'simclrr' (known: simclr, ...)
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from src.errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
