"""The Django app: `INSTALLED_APPS = [..., "notifyq.contrib.django"]` gives the schema's
migration (label "notifyq"), `manage.py notifyq_serve` and the schema check."""

from __future__ import annotations

from django.apps import AppConfig


class NotifyqConfig(AppConfig):
    name = "notifyq.contrib.django"
    label = "notifyq"
    verbose_name = "notifyq"

    def ready(self) -> None:
        from . import schema

        schema.register_checks()
