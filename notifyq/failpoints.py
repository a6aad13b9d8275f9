"""Named places where a test can make a dispatcher fail on purpose.

`NOTIFYQ_FAILPOINT=NAME:ACTION[,NAME:ACTION...]`, read once at import:

    claim-before-commit     the claim ran inside its transaction; COMMIT not yet sent
    claim-after-commit      the claim committed; its jobs not yet handed to the pool
    handler-after           a handler returned; its outcome not yet given to completion
    completion-commit       the outcome UPDATE ran inside its transaction; COMMIT not yet sent
    listen-before-poll      LISTEN succeeded; the catch-up claim not yet started

ACTION is `kill` (SIGKILL this process: a crash, no cleanup at all) or
`raise` (a FailpointError, which is a DatabaseUnavailable: the code's own
recovery from a broken connection runs, as if the socket died right there).
Each failpoint fires once per process, on the first time it is reached with
work in hand, so a `raise` exercises recovery instead of looping forever.

When the variable is unset, ACTIVE is False and every call site is a single
`if failpoints.ACTIVE:` test: the hot path pays nothing more, and the
transactions that the `*-commit` points need are only opened when set.
"""

from __future__ import annotations

import logging
import os
import signal

from .errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger("notifyq.failpoints")

NAMES = frozenset(
    {
        "claim-before-commit",
        "claim-after-commit",
        "handler-after",
        "completion-commit",
        "listen-before-poll",
    }
)
ACTIONS = frozenset({"kill", "raise"})


class FailpointError(DatabaseUnavailable):
    """Raised at a failpoint whose action is `raise`."""


def parse(spec: str) -> dict[str, str]:
    """`name:action,...` -> {name: action}; a typo is an error, never silently ignored."""
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition(":")
        if name not in NAMES or action not in ACTIONS:
            raise ConfigurationError(
                f"NOTIFYQ_FAILPOINT: {item!r} is not NAME:ACTION with NAME one of "
                f"{', '.join(sorted(NAMES))} and ACTION one of {', '.join(sorted(ACTIONS))}"
            )
        armed[name] = action
    return armed


def _read_environment() -> tuple[dict[str, str], ConfigurationError | None]:
    try:
        return parse(os.environ.get("NOTIFYQ_FAILPOINT", "")), None
    except ConfigurationError as exc:
        return {}, exc


# A bad spec must not break `import notifyq`: `check()` reports it when serving starts.
_armed, _error = _read_environment()
ACTIVE = bool(_armed)


def check() -> None:
    """Raise the ConfigurationError of a malformed NOTIFYQ_FAILPOINT, if any."""
    if _error is not None:
        raise _error


def hit(name: str) -> None:
    """Fire `name` if it is armed and has not fired yet in this process."""
    action = _armed.pop(name, None)
    if action is None:
        return
    log.warning("failpoint %s: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointError(f"failpoint {name}")
