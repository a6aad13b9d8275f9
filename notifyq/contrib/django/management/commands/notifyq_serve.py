"""`python manage.py notifyq_serve`: `notifyq serve` for the Django tasks of a backend.

The options are `notifyq serve`'s that make sense here, with its defaults (read
from Settings); the tasks and the database come from the TASKS setting.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends
from django.tasks.exceptions import InvalidTaskBackend

from notifyq import migrate
from notifyq.admin import parse_age
from notifyq.contrib.django import running
from notifyq.contrib.django.backend import Backend
from notifyq.errors import ConfigurationError, InvalidSetting, SchemaMissing
from notifyq.settings import Settings


def _age(text: str) -> float | None:
    if text.strip().lower() == "forever":
        return None
    try:
        return parse_age(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default(field: str) -> Any:
    return Settings.default(field)


class Command(BaseCommand):
    help = (
        "Run notifyq's dispatcher for the Django tasks of a notifyq task backend: LISTEN, "
        "claim in batches, run the tasks. Exit status 0 after SIGTERM/SIGINT or a one-shot "
        "run's end, 3 when --until-empty was cut short by --max-jobs or --max-runtime."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--backend",
            default=DEFAULT_TASK_BACKEND_ALIAS,
            help="The alias in TASKS whose tasks to run (default: %(default)s).",
        )
        parser.add_argument(
            "--concurrency",
            "-c",
            type=int,
            default=_default("concurrency"),
            help="Jobs run at once (async tasks on the event loop, others in threads).",
        )
        parser.add_argument(
            "--queues",
            "-q",
            metavar="Q1,Q2",
            help="Comma-separated queues to serve (default: the backend's QUEUES).",
        )
        parser.add_argument("--batch-size", type=int, help="Most jobs claimed per statement.")
        for flag, text in (
            ("--poll-interval", "Seconds between fallback polls."),
            ("--lease", "Seconds a claim holds without a heartbeat."),
            ("--shutdown-timeout", "Seconds running jobs get to finish on SIGTERM/SIGINT."),
        ):
            field = flag.removeprefix("--").replace("-", "_")
            parser.add_argument(flag, type=float, default=_default(field), help=text)
        parser.add_argument(
            "--no-listen",
            action="store_true",
            help="Find work by polling only (PgBouncer in transaction mode).",
        )
        for status in ("succeeded", "cancelled", "dead"):
            parser.add_argument(
                f"--retain-{status}",
                type=_age,
                metavar="AGE",
                default=_default(f"retain_{status}"),
                help=f"Delete {status} jobs this long after they finished (7d, 12h, 'forever').",
            )
        parser.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="Serve Prometheus metrics (pip install 'notifyq[metrics]').",
        )
        parser.add_argument("--metrics-host", default=_default("metrics_host"), metavar="HOST")
        parser.add_argument(
            "--until-empty",
            action="store_true",
            help="One-shot: exit once no job of the served queues is to start now.",
        )
        parser.add_argument("--max-jobs", type=int, metavar="N", help="Claim at most N jobs.")
        parser.add_argument(
            "--max-runtime",
            type=_age,
            metavar="DURATION",
            help="After this long (90s, 30m, 2h), stop as on SIGTERM.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["backend"]
        try:
            backend = task_backends[alias]
        except InvalidTaskBackend as exc:
            raise CommandError(str(exc)) from None
        if not isinstance(backend, Backend):
            raise CommandError(
                f"TASKS[{alias!r}] is a {type(backend).__qualname__}, not the notifyq "
                "backend (notifyq.contrib.django.Backend)"
            )
        queues = options["queues"]
        try:
            settings = Settings(
                concurrency=options["concurrency"],
                queues=tuple(q.strip() for q in queues.split(",") if q.strip())
                if queues is not None
                else tuple(sorted(backend.queues)) or None,
                batch_size=options["batch_size"],
                poll_interval=options["poll_interval"],
                lease=options["lease"],
                shutdown_timeout=options["shutdown_timeout"],
                listen=not options["no_listen"],
                metrics_port=options["metrics_port"],
                metrics_host=options["metrics_host"],
                retain_succeeded=options["retain_succeeded"],
                retain_cancelled=options["retain_cancelled"],
                retain_dead=options["retain_dead"],
                until_empty=options["until_empty"],
                max_jobs=options["max_jobs"],
                max_runtime=options["max_runtime"],
            )
        except InvalidSetting as exc:
            raise CommandError(f"--{exc.setting.replace('_', '-')} {exc.reason}") from None
        app = running.build_app(backend)
        if not len(app.registry):
            raise CommandError(
                f"no task of the backend {alias!r} was found: define them with @task in "
                "the tasks module of an installed app, or name their modules in "
                f"TASKS[{alias!r}]['OPTIONS']['MODULES']"
            )
        dsn = backend.dispatcher_dsn()
        try:
            migrate.check(dsn)
        except SchemaMissing as exc:
            raise CommandError(f"{exc} (or python manage.py migrate notifyq)") from None
        self.stdout.write(
            f"notifyq: serving {len(app.registry)} tasks of backend {alias!r} on queues "
            f"{', '.join(settings.queues or app.registry.queues())}"
        )
        self.stdout.flush()
        code = app.serve(settings, dsn=dsn)
        if code:
            sys.exit(code)
