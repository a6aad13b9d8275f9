"""Enqueue from Python, on its own or inside your transaction.

NOTIFYQ_DSN="$(notifyq dsn)" python -m examples.enqueue_from_python
"""

import os

import psycopg

from examples.hello import app, greet

# On the app's own connection: committed at once.
print("job", app.enqueue_sync(greet, {"name": "Ada"}))

# Inside your own transaction: the job exists only if the transaction commits.
with psycopg.connect(os.environ["NOTIFYQ_DSN"]) as conn:
    # ... your application's writes on `conn` ...
    print("job", app.enqueue_sync("hello.shout", {"name": "Grace"}, priority=5, conn=conn))
    conn.commit()
