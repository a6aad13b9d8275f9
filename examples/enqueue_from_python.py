"""Enqueue from Python, on its own or inside your transaction.

With `notifyq serve --app examples.hello:app` running in another terminal (its private server),
or with NOTIFYQ_DSN naming your database:

    python -m examples.enqueue_from_python
"""

import sys

import psycopg

import notifyq
from examples.hello import app, greet
from notifyq.app import resolve_dsn

try:
    # The DSN the app uses: App(dsn=...), else NOTIFYQ_DSN, else the running private server.
    dsn = resolve_dsn(app.dsn)
except notifyq.ConfigurationError as error:
    sys.exit(f"examples.enqueue_from_python: {error}")

# On the app's own connection: committed at once.
print("job", app.enqueue_sync(greet, {"name": "Ada"}))

# Inside your own transaction: the job exists only if the transaction commits.
with psycopg.connect(dsn) as conn:
    # ... your application's writes on `conn` ...
    print("job", app.enqueue_sync("hello.shout", {"name": "Grace"}, priority=5, conn=conn))
    conn.commit()
