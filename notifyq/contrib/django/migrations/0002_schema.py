"""The notifyq schema up to version 18: pause and tags (17), circuit breakers (18)
(schema.py says how the migrations work)."""

from typing import ClassVar

from django.db import migrations

from notifyq.contrib.django.schema import UpgradeSchema


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("notifyq", "0001_schema")]
    operations: ClassVar[list[UpgradeSchema]] = [UpgradeSchema(18)]
