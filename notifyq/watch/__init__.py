"""`notifyq watch`: the live terminal view.  A model that queries, a view that renders;
they meet at a Snapshot, plain data.  One job per module.  An arrow is an import, none
points back, and only the left side reaches the store (tests/test_imports.py checks):

    loop.py    once, follow: LISTEN,        live.py    LiveView: rich's Live at the
      |        coalesced refreshes,           |        terminal's size, redrawn on a
      |        reconnect with backoff         |        resize
      v                                       v
    model.py   Model: five reads through    view.py    render(): the whole screen, with
      |        store.monitoring a refresh;    |        a note per queue nothing drains
      |        history, alerts                v
      |                                     tables.py  the four tables: columns, cells,
      |                                       |        colours
      |                                       v
      |                                     layout.py  how much fits: column widths for
      |                                                a width, rows for a height
      v
    snapshot.py  Snapshot and its rows: what a refresh found, what `--json` prints
                 (the right side draws it)

`notifyq watch` (cli/watch.py) runs `follow` and hands each Snapshot to a LiveView, or
prints it as JSON; `notifyq stats` (cli/queues.py) takes `once` and prints the queue
table and its notes.
"""

from .layout import Column
from .live import LiveView
from .loop import MAX_REFRESHES, follow, once
from .model import Model
from .snapshot import Snapshot
from .tables import DISPATCHER_COLUMNS, FAILURE_COLUMNS, QUEUE_COLUMNS, RUNNING_COLUMNS, queue_table
from .view import breaker_lines, empty_queue_lines, render, unserved_lines

__all__ = [
    "DISPATCHER_COLUMNS",
    "FAILURE_COLUMNS",
    "MAX_REFRESHES",
    "QUEUE_COLUMNS",
    "RUNNING_COLUMNS",
    "Column",
    "LiveView",
    "Model",
    "Snapshot",
    "breaker_lines",
    "empty_queue_lines",
    "follow",
    "once",
    "queue_table",
    "render",
    "unserved_lines",
]
