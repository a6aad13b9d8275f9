"""How much fits: each column's width for the terminal's width, each section's rows for
its height.  Arithmetic only; tables.py and view.py draw what it allots.

A table is laid out here, not by rich: when the terminal is narrower than the table
needs, the columns that may shrink (the error, the task, the progress) are cut with "…"
first, then the least useful columns are dropped; the job id and the attempt are never
squeezed.  In the live view the frame fits the terminal's height: rows are cut from the
lower sections first, and the screen says how many rows, or which sections, it left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.console import RenderableType
from rich.text import Text

GAP = 2  # cells between two columns: a column's right padding and the (blank) divider
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Column(Generic[R]):
    """One column of a table.  The header is the JSON key of what the column shows (a
    script reading `--json` finds what it saw on screen under the same name)."""

    header: str
    cell: Callable[[R], Text]
    keep: int  # higher stays longer when the terminal is narrow
    right: bool = False  # right-justified (numbers)
    shrink: int = 0  # 0: never narrower than its content; else it may shrink to this, cut "…"
    extra: bool = False  # dropped before any column is cut


def column_widths(columns: Sequence[Column[Any]], cells: list[list[Text]], width: int) -> list[int]:
    """The width of each column, 0 for a dropped one.  While the table is too wide, the
    extra columns go, the least useful first; then the least useful columns go until the
    rest fit with the shrinkable ones at their `shrink`; then the shrinkable columns give
    up cells, the widest first.  The result fits `width` (unless one column alone does
    not), so rich never squeezes a column itself: it would take cells from the job id."""
    natural = [
        max([len(c.header)] + [row[i].cell_len for row in cells]) for i, c in enumerate(columns)
    ]
    least = [
        min(n, max(c.shrink, len(c.header))) if c.shrink else n
        for n, c in zip(natural, columns, strict=True)
    ]
    shown = list(range(len(columns)))

    def need(widths: list[int]) -> int:
        return sum(widths[i] for i in shown) + GAP * (len(shown) - 1)

    while need(natural) > width and any(columns[i].extra for i in shown):
        shown.remove(min((i for i in shown if columns[i].extra), key=lambda i: columns[i].keep))
    while len(shown) > 1 and need(least) > width:
        shown.remove(min(shown, key=lambda i: columns[i].keep))
    widths = [natural[i] if i in shown else 0 for i in range(len(columns))]
    for _ in range(need(widths) - width):
        shrinkable = [i for i in shown if widths[i] > least[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    return widths


@dataclass(slots=True)
class Section:
    """A part of the screen that can be cut: a title line, a table's header and rule (the
    overhead) and rows, of which the first `shown` appear."""

    name: str
    rows: int
    overhead: int
    body: Callable[[int], list[RenderableType]]
    shown: int = 0


def allot(sections: list[Section], height: int | None) -> None:
    """How many rows of each section fit in `height` lines.  `sections` come most
    important first: the queue table (always shown) and the alerts below it take what
    they need; then each other section gets a row, in order, and they share what is left,
    a row each in turn.  A section cut short costs a line saying how many rows are not
    shown; the sections left out share one line that names them."""
    if height is None:
        for s in sections:
            s.shown = s.rows
        return

    def lines() -> int:
        used = sum(s.overhead + s.shown + (s.shown < s.rows) for s in sections if s.shown)
        return used + any(s.rows and not s.shown for s in sections)

    def grow(s: Section) -> bool:
        s.shown += 1
        if lines() > height:
            s.shown -= 1
            return False
        return True

    sections[0].shown = 1  # the queue table, whatever the terminal's size
    for s in sections[:2]:
        while s.shown < s.rows and grow(s):
            pass
    for s in sections[2:]:
        if s.rows:
            grow(s)
    grew = True
    while grew:
        grew = False
        for s in sections[2:]:
            if 0 < s.shown < s.rows:
                grew = grow(s) or grew
