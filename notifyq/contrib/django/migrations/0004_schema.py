"""The notifyq schema up to version 20: monitoring functions and completion webhooks
(schema.py says how the migrations work)."""

from typing import ClassVar

from django.db import migrations

from notifyq.contrib.django.schema import UpgradeSchema


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("notifyq", "0003_schema")]
    operations: ClassVar[list[UpgradeSchema]] = [UpgradeSchema(20)]
