# Message rows stop paying for indexes that their unique constraints already provide.
#
# The model state changes as `makemigrations` wrote it (db_index=False on room, author and
# deleted_by, and a partial index on deleted_by). The database changes are done by hand: altering
# a foreign key field through the schema editor drops and re-adds its constraint, which re-checks
# every message row while holding locks on the messages, rooms and users; dropping the plain
# indexes needs none of that.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

COLUMNS = ("room_id", "author_id", "deleted_by_id")


def deleted_by_index():
    return models.Index(
        condition=models.Q(("deleted_by__isnull", False)),
        fields=["deleted_by"],
        name="message_deleted_by",
    )


def drop_plain_indexes(apps, schema_editor):
    """Drop the single-column, non-unique indexes Django made for the three foreign keys."""
    connection = schema_editor.connection
    table = apps.get_model("chat", "Message")._meta.db_table
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    for name, info in constraints.items():
        plain = info["index"] and not info["unique"] and not info["primary_key"]
        if plain and len(info["columns"]) == 1 and info["columns"][0] in COLUMNS:
            schema_editor.execute(f"DROP INDEX {schema_editor.quote_name(name)}")


def restore_plain_indexes(apps, schema_editor):
    table = apps.get_model("chat", "Message")._meta.db_table
    quote = schema_editor.quote_name
    for column in COLUMNS:
        schema_editor.execute(
            f"CREATE INDEX {quote(f'{table}_{column}_plain')} ON {quote(table)} ({quote(column)})"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0005_user_deleted_event"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="message",
                    name="author",
                    field=models.ForeignKey(
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="messages",
                        to=settings.AUTH_USER_MODEL,
                        verbose_name="author",
                    ),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="deleted_by",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                        verbose_name="deleted by",
                    ),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="room",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="messages",
                        to="chat.room",
                        verbose_name="room",
                    ),
                ),
                migrations.AddIndex(
                    model_name="message",
                    index=deleted_by_index(),
                ),
            ],
            database_operations=[
                migrations.RunPython(drop_plain_indexes, restore_plain_indexes),
                migrations.AddIndex(
                    model_name="message",
                    index=deleted_by_index(),
                ),
            ],
        ),
    ]
