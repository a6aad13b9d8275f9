"""The notifyq schema up to version 16 (schema.py says how the migrations work)."""

from typing import ClassVar

from django.db import migrations

from notifyq.contrib.django.schema import UpgradeSchema


class Migration(migrations.Migration):
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[UpgradeSchema]] = [UpgradeSchema(16)]
