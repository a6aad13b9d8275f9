"""The hello app: `notifyq serve --app examples.hello:app`, then from anywhere

INSERT INTO notifyq.jobs (task, payload) VALUES ('hello.greet', '{"name": "Ada"}');
"""

import logging

import notifyq

app = notifyq.App()
log = logging.getLogger("examples.hello")


@app.task(name="hello.greet")
async def greet(payload: dict[str, str], ctx: notifyq.JobContext) -> None:
    log.info("Hello, %s! (job %d, attempt %d)", payload.get("name", "world"), ctx.id, ctx.attempt)


@app.task(name="hello.shout", max_attempts=3)
def shout(payload: dict[str, str]) -> None:
    """A plain `def` handler: it runs in a worker thread."""
    name = payload.get("name")
    if not name:
        raise notifyq.PayloadError("hello.shout needs a 'name'")
    print(f"HELLO, {name.upper()}!", flush=True)
