"""A cache bounded by bytes: what the editable keeps between decisions (routed outputs, routing
similarities) is dropped least recently used first once it passes its budget."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class BytesBudget:
    """Values by key, each counted at the bytes its owner says, least recently used dropped first
    beyond `budget_bytes` (0 keeps nothing)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._kept: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def get(self, key: Hashable):
        found = self._kept.get(key)
        if found is None:
            return None
        self._kept.move_to_end(key)
        return found[0]

    def put(self, key: Hashable, value: object, size: int) -> None:
        if key in self._kept:
            self.bytes -= self._kept.pop(key)[1]
        self._kept[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget_bytes and self._kept:
            self.bytes -= self._kept.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0
