"""The live view in a terminal: each snapshot drawn with rich's Live at the terminal's
size; a resize clears the screen and draws the last snapshot again at once (loop.py
calls `redraw` on SIGWINCH).
"""

from __future__ import annotations

from rich.console import Console
from rich.live import Live

from .snapshot import Snapshot
from .view import render


class LiveView:
    """Draws snapshots in the terminal with rich's Live, each frame the terminal's size.
    After a resize the whole screen is cleared and drawn again: Live moves the cursor up
    by the last frame's height, which the terminal has rewrapped meanwhile, and would
    leave part of the old frame on screen."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = Live(console=console, auto_refresh=False, redirect_stderr=False)
        self._last: Snapshot | None = None
        self._size: tuple[int, int] | None = None

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        self._live.stop()

    def show(self, snap: Snapshot) -> None:
        self._last = snap
        width, height = self._console.size
        if self._size is not None and self._size != (width, height):
            self._console.clear()  # Live's next cursor moves start from the top: a no-op
        self._size = (width, height)
        # The last line stays free: with a frame as tall as the terminal, whatever the
        # terminal echoes after it (the ^C that ends watch) scrolls the screen by a line.
        self._live.update(render(snap, width, height - 1), refresh=True)

    def redraw(self) -> None:
        """The last snapshot again, at the terminal's current size (on SIGWINCH)."""
        if self._last is not None:
            self.show(self._last)
