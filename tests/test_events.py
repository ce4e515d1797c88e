"""`GET /{cart_id}/events`: the status as Server-Sent Events, read by a real HTTP client.

Each stream is parsed from the raw lines httpx receives, independently of cartd-client's
own parser, so the wire format itself is what is checked.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from archive_server import CHUNK_SIZE, ArchiveServer
from cartd.app import create_app
from cartd_proc import Cartd, cartd_env
from conftest import MakeService, Service, assert_error, entry, make_ready

# Fast clocks: progress reaches the database and the stream within 50 ms.
LIVE = {"progress_interval": 0.05, "events_poll_interval": 0.05, "transfer_size": 65536}


@dataclass
class Event:
    kind: str = "message"
    id: str | None = None
    retry: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads("\n".join(self.data))
        return value


def parse(lines: Iterator[str]) -> Iterator[Event]:
    """Events per the SSE spec; a comment-only block is yielded too, to see heartbeats."""
    event = Event()
    for line in lines:
        if line == "":
            if event.data or event.comments:
                yield event
            event = Event()
        elif line.startswith(":"):
            event.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event.data.append(value)
            elif name == "event":
                event.kind = value
            elif name in ("id", "retry"):
                setattr(event, name, value)


def stream(service: Service, path: str, **params: str) -> Iterator[tuple[httpx.Response, Event]]:
    """Every event of one stream, until the server ends it."""
    headers = {"Accept-Encoding": "gzip, br"}  # must not get a compressed stream anyway
    with service.client.stream("GET", path, params=params, headers=headers) as response:
        assert response.status_code == 200, response.read()
        for event in parse(response.iter_lines()):
            yield response, event


def test_stream_shows_growing_progress_and_ends_ready(
    make_service: MakeService, archive: ArchiveServer
) -> None:
    service = make_service(**LIVE)
    data = os.urandom(5 * CHUNK_SIZE + 7)
    archive.add_file("big", data)
    archive.get_chunk_delay = 0.2
    assert service.post("c", [entry("big", "big.bin", data)]).status_code == 201

    events = []
    for response, event in stream(service, "/c/events"):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        assert response.headers["cache-control"] == "no-cache"
        events.append(event)
    archive.get_chunk_delay = 0.0

    statuses = [e for e in events if e.kind == "status"]
    assert statuses == events  # no other event kinds on a normal run
    assert [int(e.id or 0) for e in events] == list(range(1, len(events) + 1))
    assert events[0].retry is not None
    staged = [e.json["bytes_staged"] for e in statuses]
    assert staged == sorted(staged), staged
    assert any(0 < n < len(data) for n in staged), f"no in-flight progress in {staged}"
    assert len({n for n in staged if 0 < n < len(data)}) >= 2, staged
    last = statuses[-1].json
    assert last["state"] == "ready"
    assert last["bytes_staged"] == len(data)
    assert last["eta_seconds"] == 0
    assert last == service.status("c")  # the same document as /status


def test_terminal_cart_gets_one_event(service: Service, archive: ArchiveServer) -> None:
    make_ready(service, archive, "c", {"a.txt": b"a"})
    events = [event for _response, event in stream(service, "/c/events", files="0")]
    assert [(e.kind, e.id) for e in events] == [("status", "1")]
    assert events[0].json["state"] == "ready"
    assert "files" not in events[0].json


def test_error_cart_ends_with_its_message(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("f", b"these bytes")
    wrong = {**entry("f", "f.txt", b"these bytes"), "hashsum": "0" * 40}
    assert service.post("c", [wrong]).status_code == 201
    events = [event for _response, event in stream(service, "/c/events")]
    last = events[-1].json
    assert last["state"] == "error"
    assert last["message"] == "Failed to pull file(File hash does not match provided hash)"


def test_unknown_and_invalid_carts(service: Service) -> None:
    message = assert_error(service.client.get("/nope/events"), 404)
    assert "nope" in message
    assert "invalid cart id" in assert_error(service.client.get("/bad%20id/events"), 400)
    assert "files" in assert_error(service.client.get("/nope/events?files=x"), 400)


def test_heartbeat_then_deleted_event(make_service: MakeService, archive: ArchiveServer) -> None:
    """A cart on tape shows no change: the stream sends comments, then ends at the DELETE."""
    service = make_service(**LIVE, events_heartbeat=0.2)
    archive.add_file("tape", b"on tape", tape_delay=math.inf)
    assert service.post("c", [entry("tape", "t.txt", b"on tape")]).status_code == 201

    seen: list[Event] = []
    for _response, event in stream(service, "/c/events", files="0"):
        seen.append(event)
        if event.comments and not any(e.comments for e in seen[:-1]):
            assert service.client.delete("/c").status_code == 200
    assert seen[0].kind == "status"
    assert "files" not in seen[0].json
    assert any(e.comments == ["keepalive"] and not e.data for e in seen)
    assert seen[-1].kind == "deleted"
    assert seen[-1].json["cart_id"] == "c"
    ids = [int(e.id) for e in seen if e.id]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))


def test_openapi_documents_events_and_progress_fields() -> None:
    document = create_app().openapi()
    events = document["paths"]["/{cart_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert set(events["responses"]) == {"200", "400", "401", "403", "404", "500"}
    assert "application/json" in events["responses"]["404"]["content"]
    status = document["paths"]["/{cart_id}/status"]["get"]
    for operation in (events, status):
        (files,) = [p for p in operation["parameters"] if p["name"] == "files"]
        assert files["in"] == "query"
        assert files["required"] is False
    schema = document["components"]["schemas"]["CartStatus"]
    assert {"eta_seconds", "files_waiting", "files_staging"} <= set(schema["required"])
    assert "files" not in schema["required"]
    head = document["paths"]["/{cart_id}"]["head"]["responses"]["204"]
    assert "Retry-After" in head["headers"]


def test_sigterm_ends_open_streams_instead_of_waiting_for_them(
    db_url: str, archive: ArchiveServer, tmp_path: Path
) -> None:
    """A watcher of a cart on tape would otherwise hold shutdown for the whole grace period."""
    env = cartd_env(db_url, tmp_path / "volume", archive.url, shutdown_grace="60")
    service = Cartd(env, tmp_path / "cartd.log").wait_up()
    try:
        archive.add_file("tape", b"on tape", tape_delay=math.inf)
        assert service.post("c", [entry("tape", "t.txt", b"on tape")]).status_code == 201
        with service.client.stream("GET", "/c/events", params={"files": "0"}) as response:
            events = parse(response.iter_lines())
            while next(events).json["state"] != "staging":
                pass  # the file is claimed; it then stays on tape for good
            signalled = time.monotonic()
            service.terminate()
            # The stream ends with no verdict on the cart. A status sent just before the
            # signal arrived may still be in flight, so only terminal events are refused.
            rest = [(event.kind, event.json.get("state")) for event in events if event.data]
            assert all(state in ("waiting", "staging") for _kind, state in rest), rest
            assert all(kind == "status" for kind, _state in rest), rest
        assert service.proc.wait(timeout=30) in (0, -15)
        assert time.monotonic() - signalled < 30, "shutdown waited for the event stream"
    finally:
        service.kill()
