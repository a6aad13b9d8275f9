"""Settings of the test project: its database is NOTIFYQ_DJANGO_DSN (a libpq connection
string; the in-process tests point it at each test's database afterwards)."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

_dsn = conninfo_to_dict(os.environ.get("NOTIFYQ_DJANGO_DSN", "dbname=postgres"))

SECRET_KEY = "notifyq-tests"
USE_TZ = True
INSTALLED_APPS = ["notifyq.contrib.django", "tests.django_project.shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _dsn.get("dbname", "postgres"),
        "USER": _dsn.get("user", ""),
        "PASSWORD": _dsn.get("password", ""),
        "HOST": _dsn.get("host", ""),
        "PORT": str(_dsn.get("port", "")),
        # How the tests find this project's connections in pg_stat_activity.
        "OPTIONS": {"application_name": "notifyq-django-test"},
    }
}
TASKS = {
    "default": {
        "BACKEND": "notifyq.contrib.django.Backend",
        "QUEUES": ["default", "mail"],
        "OPTIONS": {"MAX_ATTEMPTS": int(os.environ.get("NOTIFYQ_DJANGO_MAX_ATTEMPTS", "1"))},
    }
}
