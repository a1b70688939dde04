"""Counters and histograms for ``/metrics``, in Prometheus' text format (no client library)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Histogram:
    """Cumulative counts of observations at most each bound, their sum and count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i in range(bisect.bisect_left(self.bounds, value), len(self.bounds)):
                self.counts[i] += 1
            self.total += value
            self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{suffix} {self.total:.6g}", f"{name}_count{suffix} {self.count}"]


def metric(name: str, kind: str, help: str, samples: Iterable[str]) -> str:
    """One metric family: its HELP and TYPE lines, then its samples."""
    return "\n".join([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])


def escape(value: str) -> str:
    """A label value as Prometheus writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
