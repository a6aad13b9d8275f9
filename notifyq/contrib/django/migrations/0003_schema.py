"""The notifyq schema up to version 19: unique_for windows, debounce and results for
dependents (schema.py says how the migrations work)."""

from typing import ClassVar

from django.db import migrations

from notifyq.contrib.django.schema import UpgradeSchema


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("notifyq", "0002_schema")]
    operations: ClassVar[list[UpgradeSchema]] = [UpgradeSchema(19)]
