"""The table: per scenario, one row per system, median (min-max) of every metric."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Cell:
    runs: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    status: str | None = None  # "n/a", "not installed ...": no runs at all


def number(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def summary(values: Sequence[float]) -> str:
    med = number(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({number(min(values))}-{number(max(values))})"


def render(
    header: list[str],
    command: str,
    scenarios: dict[str, str],
    cells: dict[tuple[str, str], Cell],
    systems: list[str],
    notes: list[str],
) -> str:
    lines = [f"# {h}" for h in header]
    width = max(len(s) for s in systems) + 2
    for scenario, title in scenarios.items():
        # Each table names the command that produced it, so it can be quoted alone.
        lines += ["", f"{scenario}: {title}", f"  $ {command}"]
        metrics: list[str] = []
        for system in systems:
            for run in cells[scenario, system].runs:
                metrics += [m for m in run if m not in metrics]
        cols = [max(len(m), 20) for m in metrics]
        lines.append(
            "  "
            + "system".ljust(width)
            + "  ".join(m.rjust(w) for m, w in zip(metrics, cols, strict=True))
        )
        for system in systems:
            cell = cells[scenario, system]
            row = "  " + system.ljust(width)
            if cell.status is not None:
                lines.append(row + cell.status)
                continue
            if cell.runs:
                row += "  ".join(
                    summary([r[m] for r in cell.runs if m in r]).rjust(w)
                    for m, w in zip(metrics, cols, strict=True)
                )
            if cell.failures:
                row += f"  [{len(cell.failures)} failed: {cell.failures[-1]}]"
            lines.append(row)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
