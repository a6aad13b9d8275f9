"""Typed payloads (typed_payloads.py): a handler annotated with a dataclass or a pydantic
model receives a validated instance; enqueue takes an instance and checks an object; a
payload that fails validation is dead at once with the validation error."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import pydantic
import pytest
from click.testing import CliRunner

import notifyq
from notifyq import InvalidJob, cli, typed_payloads
from notifyq.errors import ConfigurationError
from tests.conftest import query
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Address:
    city: str


@dataclasses.dataclass
class Letter:
    to: str
    copies: int
    address: Address
    note: str = ""


class Invoice(pydantic.BaseModel):
    number: int
    lines: list[str]


def typed_app(dsn: str, seen: list[Any], done: anyio.Event, count: int) -> notifyq.App:
    app = notifyq.App(dsn=dsn)

    def record(payload: Any) -> None:
        seen.append(payload)
        if len(seen) >= count:
            done.set()

    @app.task(name="letters.send", max_attempts=5)
    async def send(payload: Letter) -> None:
        record(payload)

    @app.task(name="invoices.post", max_attempts=5)
    def post(payload: Invoice, ctx: notifyq.JobContext) -> None:
        record(payload)

    return app


async def test_handlers_receive_validated_instances(dsn: str) -> None:
    seen: list[Any] = []
    done = anyio.Event()
    app = typed_app(dsn, seen, done, count=3)
    async with serving(app, dsn, poll_interval=3600):
        await app.enqueue("letters.send", Letter("Ada", 2, Address("London")))
        # A plain object is checked at enqueue and built into the model for the handler
        # (pydantic, installed here, coerces "3" to 3 for a dataclass as for a model).
        await app.enqueue("letters.send", {"to": "Bo", "copies": "3", "address": {"city": "Oslo"}})
        await app.enqueue("invoices.post", Invoice(number=7, lines=["tea"]))
        with anyio.fail_after(10):
            await done.wait()
    await app.aclose()
    letters = sorted((p for p in seen if isinstance(p, Letter)), key=lambda p: p.to)
    assert letters == [Letter("Ada", 2, Address("London")), Letter("Bo", 3, Address("Oslo"))]
    assert [p for p in seen if isinstance(p, Invoice)] == [Invoice(number=7, lines=["tea"])]
    stored = query(dsn, "SELECT payload FROM notifyq.jobs WHERE task = 'invoices.post'")
    assert stored == [({"number": 7, "lines": ["tea"]},)]  # the model's JSON dump


async def test_a_payload_that_fails_validation_is_dead_at_once(dsn: str) -> None:
    """Inserted by SQL (no enqueue to check it): the handler never runs, and the job goes
    dead on its first attempt with the model's complaint, although 5 attempts are allowed."""
    seen: list[Any] = []
    app = typed_app(dsn, seen, anyio.Event(), count=1)
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES"
        """ ('invoices.post', '{"number": "seven", "lines": []}'),"""
        """ ('letters.send', '{"to": "Cy"}')""",
    )
    async with serving(app, dsn, poll_interval=3600):

        def both_dead() -> list[tuple[Any, ...]]:
            rows = query(
                dsn, "SELECT task, status, attempts, last_error FROM notifyq.jobs ORDER BY task"
            )
            return rows if all(r[1] == "dead" for r in rows) else []

        rows = await eventually(both_dead)
    await app.aclose()
    assert seen == []
    (invoice, letter) = rows
    assert invoice[:3] == ("invoices.post", "dead", 1)
    assert "PayloadError" in invoice[3] and "ValidationError" in invoice[3]
    assert "number" in invoice[3]
    assert letter[:3] == ("letters.send", "dead", 1)
    assert "copies" in letter[3] and "address" in letter[3]  # the missing fields, named


async def test_enqueue_refuses_what_the_model_refuses_before_sending(dsn: str) -> None:
    app = typed_app(dsn, [], anyio.Event(), count=1)
    with pytest.raises(InvalidJob, match=r"does not fit Invoice, which the handler of invoices"):
        await app.enqueue("invoices.post", {"number": 1})
    with pytest.raises(InvalidJob, match=r"payload #1\): the payload does not fit Letter"):
        await app.enqueue_many(
            "letters.send",
            [Letter("A", 1, Address("X")), {"to": "B"}],
        )
    # An instance of another model is dumped, then checked like any object.
    with pytest.raises(InvalidJob, match="does not fit Letter"):
        app.enqueue_sync("letters.send", Invoice(number=1, lines=[]))
    await app.aclose()
    app.close()
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


def test_enqueue_on_the_command_line_checks_the_model(dsn: str) -> None:
    result = CliRunner().invoke(
        cli.main,
        [
            "enqueue",
            "--dsn",
            dsn,
            "--app",
            "tests.apps.typed:app",
            "typed.invoice",
            '{"number": "x", "lines": []}',
        ],
    )
    assert result.exit_code == 2, result.output
    assert "takes Invoice, which PAYLOAD does not fit" in result.output
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


def test_without_pydantic_a_dataclass_is_built_field_by_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(typed_payloads, "_pydantic_type_adapter", lambda: None)
    decode = typed_payloads.decoder(Letter)
    assert decode({"to": "A", "copies": 1, "address": {"city": "X"}}) == Letter(
        "A",
        1,
        {"city": "X"},  # type: ignore[arg-type]  # nothing nested is built
    )
    with pytest.raises(ValueError, match="needs field 'copies'"):
        decode({"to": "A", "address": {}})
    with pytest.raises(ValueError, match="has no field 'colour'"):
        decode({"to": "A", "copies": 1, "address": {}, "colour": "red"})
    with pytest.raises(ValueError, match="takes a JSON object, not list"):
        decode([1])


def test_an_explicit_decode_wins_and_plain_annotations_stay_json() -> None:
    app = notifyq.App(dsn="postgresql://unused")

    @app.task(name="a", decode=lambda p: p)
    def a(payload: Letter) -> None: ...

    @app.task(name="b")
    def b(payload: dict[str, Any]) -> None: ...

    assert [app.registry.get(n).model for n in ("a", "b")] == [None, None]  # type: ignore[union-attr]


@dataclasses.dataclass
class Unvalidatable:
    handle: Any = dataclasses.field(default_factory=lambda: None)
    lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)


def test_a_dataclass_pydantic_cannot_validate_is_refused_at_registration() -> None:
    app = notifyq.App(dsn="postgresql://unused")
    with pytest.raises(ConfigurationError, match="give the task decode="):

        @app.task(name="c")
        def c(payload: Unvalidatable) -> None: ...


class Aliased(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(populate_by_name=False)
    user_id: int = pydantic.Field(alias="userId")


def test_a_model_with_aliases_goes_out_and_comes_back_by_its_aliases() -> None:
    sent = typed_payloads.to_payload(Aliased(userId=3), Aliased, typed_payloads.decoder(Aliased))
    assert sent == {"userId": 3}
    assert typed_payloads.decoder(Aliased)(sent) == Aliased(userId=3)


def test_only_the_payloads_annotation_must_resolve(caplog: pytest.LogCaptureFixture) -> None:
    app = notifyq.App(dsn="postgresql://unused")

    @app.task(name="typed")
    def typed(payload: Letter, ctx: ImportedOnlyForTypeCheckers) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    # As a class defined after the handler is, while its module is still being imported.
    @app.task(name="later")
    def later(payload: NotDefinedYet) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    assert app.registry.get("typed").model is Letter  # type: ignore[union-attr]
    assert app.registry.get("later").model is None  # type: ignore[union-attr]
    assert "'NotDefinedYet' of" in caplog.text and "define the class before" in caplog.text


def test_a_key_the_dataclass_lacks_is_refused_with_pydantic_as_without() -> None:
    with pytest.raises(ValueError, match="has no field 'colour'"):
        typed_payloads.decoder(Address)({"city": "X", "colour": "red"})
