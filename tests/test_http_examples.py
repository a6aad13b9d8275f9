"""The signature snippets of examples/http under Node, against Python's `notifyq.http.sign`.

verify-node.mjs (node:crypto) and verify-webcrypto.mjs (Web Crypto only: the Deno, edge
and Workers snippet, run here under Node's Web Crypto, the same API) each check a table of
requests signed in Python through a small driver script; endpoint-node.mjs runs as a real
server on a free port and gets real signed POSTs.  Skipped, saying why, without `node`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from notifyq.http import SIGNATURE_HEADER, sign
from tests.conftest import REPO, wait_until

EXAMPLES = REPO / "examples" / "http"
SECRET = "whsec_example_secret"
BODY = json.dumps({"id": 42, "task": "report.generate", "payload": {"n": "é"}}).encode()

# Reads [{secret, headers, body (base64), now, tolerance, fetch_headers}] on stdin, calls
# the snippet's verify on each, prints [{ok, name, message}]: one node process per table.
DRIVER = """
import { pathToFileURL } from "node:url";
const { verify } = await import(pathToFileURL(process.argv[2]).href);
let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const c of JSON.parse(input)) {
  const headers = c.fetch_headers ? new Headers(c.headers) : c.headers;
  const body = new Uint8Array(Buffer.from(c.body, "base64"));
  const options = {};
  if (c.now !== null) options.now = c.now;
  if (c.tolerance !== null) options.tolerance = c.tolerance;
  try {
    await verify(c.secret, headers, body, options);
    results.push({ ok: true });
  } catch (error) {
    results.push({ ok: false, name: error.name, message: error.message });
  }
}
console.log(JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("the examples/http snippets need node (>= 20) on PATH (Debian: nodejs)")
    return node


@dataclass
class Case:
    name: str
    headers: dict[str, str]
    body: bytes = BODY
    secret: str = SECRET
    now: float | None = None
    tolerance: float | None = None
    fetch_headers: bool = False
    error: str | None = None  # a part of the SignatureError message; None: verifies


def cases() -> list[Case]:
    now = int(time.time())
    t = 1733450000
    fixed = sign(SECRET, BODY, timestamp=t)
    return [
        Case("signed now", {SIGNATURE_HEADER: sign(SECRET, BODY)}),
        Case("lowercase name", {"notifyq-signature": sign(SECRET, BODY)}),
        Case("Fetch Headers", {SIGNATURE_HEADER: fixed}, now=t, fetch_headers=True),
        Case("first of two secrets", {SIGNATURE_HEADER: sign([SECRET, "old"], BODY)}),
        Case("second of two secrets", {SIGNATURE_HEADER: sign(["new", SECRET], BODY)}),
        Case("edge of tolerance", {SIGNATURE_HEADER: fixed}, now=t + 300),
        Case("empty body", {SIGNATURE_HEADER: sign(SECRET, b"", timestamp=now)}, body=b""),
        Case(
            "changed body",
            {SIGNATURE_HEADER: fixed},
            body=BODY.replace(b"42", b"43"),
            now=t,
            error="no v1 signature",
        ),
        Case(
            "changed timestamp",
            {SIGNATURE_HEADER: fixed.replace(f"t={t}", f"t={t + 1}")},
            now=t,
            error="no v1 signature",
        ),
        Case("old", {SIGNATURE_HEADER: fixed}, now=t + 301, error="301 s old"),
        Case(
            "old, short tolerance",
            {SIGNATURE_HEADER: fixed},
            now=t + 31,
            tolerance=30,
            error="tolerance of 30 s",
        ),
        Case("old by the clock", {SIGNATURE_HEADER: fixed}, error="s old"),
        Case("future", {SIGNATURE_HEADER: fixed}, now=t - 301, error="301 s in the future"),
        Case("wrong secret", {SIGNATURE_HEADER: fixed}, secret="other", now=t, error="no v1"),
        Case("no header", {"Content-Type": "application/json"}, error="no Notifyq-Signature"),
        Case("malformed t", {SIGNATURE_HEADER: "t=soon,v1=ab"}, error="malformed"),
        Case("no v1", {SIGNATURE_HEADER: f"t={t}"}, now=t, error="malformed"),
        Case("short v1", {SIGNATURE_HEADER: f"t={t},v1=abc"}, now=t, error="64 hex digits"),
    ]


@pytest.mark.parametrize("snippet", ["verify-node.mjs", "verify-webcrypto.mjs"])
def test_snippet_agrees_with_python(node: str, snippet: str, tmp_path: Path) -> None:
    driver = tmp_path / "driver.mjs"
    driver.write_text(DRIVER)
    table = cases()
    wire = [
        {
            "secret": c.secret,
            "headers": c.headers,
            "body": base64.b64encode(c.body).decode(),
            "now": c.now,
            "tolerance": c.tolerance,
            "fetch_headers": c.fetch_headers,
        }
        for c in table
    ]
    run = subprocess.run(
        [node, str(driver), str(EXAMPLES / snippet)],
        input=json.dumps(wire),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert len(results) == len(table)
    for case, result in zip(table, results, strict=True):
        if case.error is None:
            assert result == {"ok": True}, (case.name, result)
        else:
            assert not result["ok"], (case.name, result)
            assert result["name"] == "SignatureError", (case.name, result)
            assert case.error in result["message"], (case.name, result)


class Endpoint:
    """endpoint-node.mjs as a process on a free port; stdout (one line a request) in `log`."""

    def __init__(self, node: str, log: Path, secret: str) -> None:
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "NOTIFYQ_SECRET": secret}
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [node, str(EXAMPLES / "endpoint-node.mjs")],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        found = wait_until(self._listening, timeout=30, message="endpoint-node to listen")
        self.url = f"http://127.0.0.1:{found.group(1)}/"

    def _listening(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"endpoint-node exited: {self.log.read_text()}")
        return re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text())

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@contextmanager
def endpoint(node: str, log: Path, secret: str = SECRET) -> Iterator[Endpoint]:
    server = Endpoint(node, log, secret)
    try:
        yield server
    finally:
        server.close()


def post(url: str, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return httpx.post(url, content=body, headers=headers, timeout=10)


def test_endpoint_answers_200_to_signed_jobs_and_401_to_the_rest(node: str, tmp_path: Path) -> None:
    with endpoint(node, tmp_path / "endpoint.log") as server:
        good = post(server.url, BODY, sign(SECRET, BODY))
        assert good.status_code == 200
        assert good.json() == {"ok": True, "id": 42}
        rotated = post(server.url, BODY, sign(["next", SECRET], BODY))
        assert rotated.status_code == 200

        tampered = post(server.url, BODY.replace(b"42", b"43"), sign(SECRET, BODY))
        old = post(server.url, BODY, sign(SECRET, BODY, timestamp=int(time.time()) - 600))
        wrong = post(server.url, BODY, sign("not-the-secret", BODY))
        unsigned = post(server.url, BODY, None)
        refused: dict[str, httpx.Response] = {
            "tampered": tampered,
            "old": old,
            "wrong": wrong,
            "unsigned": unsigned,
        }
        for name, response in refused.items():
            assert response.status_code == 401, name
            assert response.json()["ok"] is False, name
        assert "no v1 signature" in tampered.json()["error"]
        assert "s old" in old.json()["error"]
        assert "no Notifyq-Signature header" in unsigned.json()["error"]

        not_json = post(server.url, b"not json", sign(SECRET, b"not json"))
        assert not_json.status_code == 400
        assert httpx.get(server.url, timeout=10).status_code == 405

        # One line per request, in order, with the status (the request is answered first,
        # so the line may land a moment after the response).
        wait_until(lambda: len(server.lines()) == 8, timeout=10, message="8 log lines")
        statuses = [line.split()[2] for line in server.lines()]
        assert statuses == ["200", "200", "401", "401", "401", "401", "400", "405"]
        assert server.lines()[0] == "POST / 200 id=42"
        assert server.proc.poll() is None


def test_endpoint_refuses_to_start_without_a_secret(node: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYQ_SECRET"}
    run = subprocess.run(
        [node, str(EXAMPLES / "endpoint-node.mjs")],
        env={**env, "PORT": "0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "set NOTIFYQ_SECRET" in run.stderr
