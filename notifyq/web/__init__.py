"""`notifyq web`: the dashboard in a browser, `notifyq watch`'s counterpart.  Needs
the `web` extra (pip install 'notifyq[web]': Starlette and uvicorn).

    app.py       create_app(): the Starlette app; routes, reads through the store,
      |          actions through admin.py (the CLI's SQL functions)
      +-- hub.py       one LISTEN connection and one watch Model per process: coalesced
      |                refreshes, one rendered fragment fanned out to every SSE stream
      +-- pages.py     the HTML, escaped; no I/O
      +-- security.py  token, CSRF, binding and response headers
    server.py    uvicorn: alone, or beside a dispatcher in its loop
    static/      dashboard.css and dashboard.js, shipped in the wheel

Mount it in your own ASGI app with `Mount("/queue", app=create_app(dsn))` and enter
its lifespan in yours (docs/web.md).
"""

from .app import create_app
from .security import TOKEN_ENV, check_bind
from .server import run, serve_beside

__all__ = ["TOKEN_ENV", "check_bind", "create_app", "run", "serve_beside"]
