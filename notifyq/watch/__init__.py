"""`notifyq watch`: the live terminal view.  A model that queries, a view that renders.

One job per module; the arrows are imports, and none points back:

    loop.py      once / follow: LISTEN, coalesced refreshes, reconnect with backoff
      |
      v
    model.py     Model: five reads through store.monitoring per refresh; history, alerts
      |
      v
    snapshot.py  Snapshot and its rows: what a refresh found (`--json` prints it)
      ^
      |
    tables.py    the four tables: columns, cells, colours  --> layout.py: how much fits
      ^                                                         (widths, rows per height)
      |
    view.py      render(): the whole screen, notes included  --> layout.py
      ^
      |
    live.py      LiveView: rich's Live at the terminal's size, redrawn on a resize

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
from .view import empty_queue_lines, render, unserved_lines

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
    "empty_queue_lines",
    "follow",
    "once",
    "queue_table",
    "render",
    "unserved_lines",
]
