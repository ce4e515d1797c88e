"""Access control (CARTD_AUTH=token|proxy) through real HTTP, and cart ownership.

Proxy tests need a client that is *not* the trusted proxy: every 127.x.y.z address routes to
the loopback interface on Linux, so a client bound to 127.0.0.2 reaches the service from
an address outside CARTD_TRUSTED_PROXIES=127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import sqlalchemy as sa
from alembic import command
from pacifica.downloader import Downloader

from archive_server import ArchiveServer
from cartd.api.auth import AuthConfigError
from cartd.app import create_app
from cartd.cli import main
from cartd.client import main as client_main
from cartd.settings import Settings
from cartd.tokens import TokenFileError, parse_tokens
from cartd_proc import Cartd, cartd_env
from conftest import (
    MakeService,
    Service,
    assert_error,
    database,
    entry,
    make_ready,
    schema_at,
)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
TOKENS = f"# cartd tokens\n\nalice:{ALICE}\n  bob : {BOB}  \n"


def _tokens_file(tmp_path: Path, text: str = TOKENS) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


# --- the token file ---------------------------------------------------------------------


def test_token_file_format() -> None:
    tokens = parse_tokens(TOKENS + "alice:second-token-for-rotation\n", "tokens")
    assert tokens.identify(ALICE) == "alice"
    assert tokens.identify(BOB) == "bob"
    assert tokens.identify("second-token-for-rotation") == "alice"
    assert tokens.identify(ALICE[:-1]) is None
    assert tokens.identify("") is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no 'identity:token' lines"),
        ("# only a comment\n\n", "no 'identity:token' lines"),
        (f"alice {ALICE}\n", "line 1: expected 'identity:token'"),
        (f"alice:{ALICE}\n:{BOB}\n", "line 2: expected 'identity:token'"),
        ("alice:short\n", "at least 16"),
        ("alice:has a space in it, long\n", "without spaces"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "already given to 'alice'"),
        (f"{'x' * 256}:{ALICE}\n", "1-255 printable"),
    ],
)
def test_malformed_token_files_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(TokenFileError, match=complaint):
        parse_tokens(text, "tokens")


def test_start_up_refuses_unusable_access_settings(tmp_path: Path) -> None:
    base = {"volume_path": tmp_path / "volume"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"auth": "token"}, "needs CARTD_AUTH_TOKENS_FILE"),
        ({"auth": "token", "auth_tokens_file": tmp_path / "absent"}, "cannot read"),
        ({"auth": "token", "auth_tokens_file": _tokens_file(tmp_path, "")}, "nobody"),
        ({"auth": "proxy", "trusted_proxies": "*"}, "any client could claim"),
        ({"auth": "proxy", "trusted_proxies": ""}, "any client could claim"),
        ({"trusted_proxies": "127.0.0.1,proxy.example"}, "'proxy.example' is not an IP"),
    ]
    for overrides, complaint in cases:
        with pytest.raises(AuthConfigError, match=complaint):
            create_app(Settings(**base, **overrides))


def test_cartd_serve_names_the_problem_and_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARTD_VOLUME_PATH", str(tmp_path / "volume"))
    monkeypatch.setenv("CARTD_AUTH", "token")
    monkeypatch.setenv("CARTD_AUTH_TOKENS_FILE", str(tmp_path / "absent"))
    with pytest.raises(SystemExit) as exited:
        main(["serve"])
    assert str(exited.value).startswith("cartd serve: cannot read CARTD_AUTH_TOKENS_FILE")


# --- token mode -------------------------------------------------------------------------


@pytest.fixture
def token_service(make_service: MakeService, tmp_path: Path) -> Service:
    return make_service(auth="token", auth_tokens_file=_tokens_file(tmp_path))


def test_token_mode_needs_a_valid_token(token_service: Service, archive: ArchiveServer) -> None:
    client = token_service.client
    archive.add_file("t1", b"one")
    body = {"fileids": [entry("t1", "one.txt", b"one")]}
    refusals = [
        ({}, None),
        (_bearer("not-a-token-of-anybody"), "invalid_token"),
        (_bearer(ALICE + "x"), "invalid_token"),
        ({"Authorization": f"Token {ALICE}"}, None),
        (_basic("bob", ALICE), "invalid_token"),  # alice's token, bob's name
        ({"Authorization": "Basic !!!"}, "invalid_request"),
        ({"Authorization": b"Basic \xe9t\xe9"}, "invalid_request"),  # not even ASCII
    ]
    for headers, error in refusals:
        response = client.post("/c", json=body, headers=headers)
        assert_error(response, 401)
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="cartd"'), challenge
        assert (f'error="{error}"' in challenge) == (error is not None), challenge
    # Authentication comes first: an unauthenticated client learns nothing, not even 400.
    assert_error(client.get("/bad%20id/status"), 401)
    head = client.head("/c")
    assert (head.status_code, head.headers["X-Pacifica-Status"]) == (401, "error")
    assert client.post("/c", json=body, headers=_bearer(ALICE)).status_code == 201
    assert client.head("/c", headers=_basic("alice", ALICE)).status_code == 204
    # Open to all: these say nothing about anybody's carts.
    assert client.get("/").json() == {"message": "Pacifica Cartd Interface Up and Running"}
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def _verbs(client: httpx.Client, cart_id: str, headers: dict[str, str]) -> list[Any]:
    """What every verb but POST answers about a cart id, message ids made uniform."""
    answers: list[Any] = []
    for method, path in [
        ("HEAD", ""),
        ("GET", ""),
        ("GET", "/status"),
        ("GET", "/events"),
        ("DELETE", ""),
    ]:
        response = client.request(method, f"/{cart_id}{path}", headers=headers)
        shown = {k: v for k, v in response.headers.items() if k.lower().startswith("x-pacifica")}
        answers.append((method, path, response.status_code, shown, response.text))
    return [repr(answer).replace(cart_id, "ID") for answer in answers]


def test_a_cart_belongs_to_whoever_created_it(
    token_service: Service, archive: ArchiveServer
) -> None:
    """Bob gets exactly what he gets for an id nobody uses; Alice keeps her cart."""
    client, alice, bob = token_service.client, _bearer(ALICE), _bearer(BOB)
    token_service.client.headers.update(alice)
    make_ready(token_service, archive, "mine", {"a.txt": b"alice's data"})
    token_service.client.headers.clear()

    bob_sees = _verbs(client, "mine", bob)
    assert bob_sees == _verbs(client, "nobodys", bob)
    assert all(" 404, " in answer for answer in bob_sees), bob_sees
    assert client.head("/mine", headers=alice).headers["X-Pacifica-Status"] == "ready"

    # Bob's POST of the same id makes a cart of his own: neither 409 nor a hint.
    archive.add_file("b", b"bob's data")
    posted = client.post(
        "/mine", json={"fileids": [entry("b", "b.txt", b"bob's data")]}, headers=bob
    )
    assert posted.status_code == 201, posted.text
    assert client.get("/mine/status", headers=bob).json()["files"][0]["path"] == "b.txt"
    assert client.get("/mine/status", headers=alice).json()["files"][0]["path"] == "a.txt"
    assert client.delete("/mine", headers=bob).status_code == 200
    assert client.head("/mine", headers=_basic("alice", ALICE)).status_code == 204
    assert b"alice's data" in client.get("/mine", headers=alice).content
    assert client.delete("/mine", headers=alice).status_code == 200
    assert_error(client.get("/mine/status", headers=alice), 404)


class BearerAuth(requests.auth.AuthBase):
    """A requests auth object: pacifica-downloader passes it on to every request."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def _event(archive: ArchiveServer, file_id: str, data: bytes) -> dict[str, Any]:
    archive.add_file(file_id, data)
    return {
        "data": [
            {
                "destinationTable": "Files",
                "_id": file_id,
                "name": "f.txt",
                "subdir": "d",
                "hashtype": "sha1",
                "hashsum": hashlib.sha1(data).hexdigest(),
            }
        ]
    }


def test_pacifica_downloader_auth_argument(
    token_service: Service, archive: ArchiveServer, tmp_path: Path
) -> None:
    """`auth` is a dict of requests keyword arguments: `{"auth": (identity, token)}`.

    (Each download waits at least a second: the downloader sleeps that long between polls.)
    """
    url = token_service.url
    data = b"alice's file\n"
    Downloader(cart_api_url=url, auth={"auth": ("alice", ALICE)}).cloudevent(
        str(tmp_path / "out"), _event(archive, "d1", data), filename="c.tar", timeout=30
    )
    assert (tmp_path / "out" / "c" / "d" / "f.txt").read_bytes() == data
    # A requests auth object works too: it is passed on to every request the same way.
    bearer = requests.head(f"{url}/anything", auth=BearerAuth(BOB), timeout=30)
    assert bearer.status_code == 404  # authenticated as bob, who has no such cart
    with pytest.raises(AssertionError):  # setup_cart asserts 201 and got 401
        Downloader(cart_api_url=url).cloudevent(
            str(tmp_path / "none"), _event(archive, "d9", b"x"), timeout=30
        )


def test_cartd_client_token_file(
    token_service: Service,
    archive: ArchiveServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive.add_file("k", b"kept")
    cart = tmp_path / "cart.json"
    cart.write_text(json.dumps({"fileids": [entry("k", "k.txt", b"kept")]}))
    token = tmp_path / "alice.token"
    token.write_text(f"# alice\n{ALICE}\n")
    out = tmp_path / "out"
    get = ["get", str(cart), "-o", str(out), "--url", token_service.url, "--quiet"]
    assert client_main(get) == 2  # no token: exit 2, the credentials are wrong, not the cart
    assert "not authorised" in capsys.readouterr().err  # not some other exit-2 error
    assert client_main([*get, "--token-file", str(token)]) == 0
    assert (out / "cart" / "k.txt").read_bytes() == b"kept"


# --- proxy mode -------------------------------------------------------------------------


@pytest.fixture
def outsider(make_service: MakeService) -> Iterator[tuple[Service, httpx.Client]]:
    """A proxy-mode service, and a client on 127.0.0.2: not the trusted proxy 127.0.0.1."""
    service = make_service(auth="proxy", trusted_proxies="127.0.0.1")
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=service.url, transport=transport, timeout=30) as client:
        yield service, client


def _post(client: httpx.Client, cart_id: str, **headers: str) -> httpx.Response:
    body = {"fileids": [entry("p", "p.txt", b"p")]}
    return client.post(f"/{cart_id}", json=body, headers=headers)


def test_proxy_mode_believes_only_the_trusted_proxy(
    outsider: tuple[Service, httpx.Client], archive: ArchiveServer
) -> None:
    service, stranger = outsider
    proxy = service.client
    archive.add_file("p", b"p")
    user = {"X-Remote-User": "alice"}
    assert "must come through the proxy" in assert_error(_post(stranger, "c", **user), 403)
    # A stranger cannot borrow the proxy's address through X-Forwarded-For either.
    spoofed = _post(stranger, "c", **user, **{"X-Forwarded-For": "127.0.0.1"})
    assert_error(spoofed, 403)
    assert "X-Remote-User" in assert_error(_post(proxy, "c"), 403)
    assert_error(_post(proxy, "c", **{"X-Remote-User": "x" * 256}), 403)  # too long to own
    # The proxy forwards a real client: the trust check uses the proxy's own address.
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    created = _post(proxy, "c", **user, **forwarded)
    assert created.status_code == 201, created.text
    assert created.headers["Location"].startswith("https://")  # forwarded headers still apply
    assert stranger.get("/").status_code == 200
    assert proxy.head("/c", headers={"X-Remote-User": "bob"}).status_code == 404
    assert proxy.get("/c/status", headers=user).json()["cart_id"] == "c"


def test_cartd_serve_judges_the_real_peer(tmp_path: Path, archive: ArchiveServer) -> None:
    """The same through `cartd serve`, whose uvicorn must leave X-Forwarded-For to the app."""
    with database("sqlite", tmp_path) as url:
        env = cartd_env(url, tmp_path / "volume", archive.url, auth="proxy")
        service = Cartd(env, tmp_path / "cartd.log").wait_up()
        try:
            archive.add_file("p", b"p")
            user = {"X-Remote-User": "alice", "X-Forwarded-For": "203.0.113.9"}
            assert _post(service.client, "c", **user).status_code == 201
            transport = httpx.HTTPTransport(local_address="127.0.0.2")
            with httpx.Client(base_url=service.url, transport=transport) as stranger:
                spoofed = {**user, "X-Forwarded-For": "127.0.0.1"}
                assert_error(_post(stranger, "c", **spoofed), 403)
        finally:
            service.kill()


# --- schema 0005 ------------------------------------------------------------------------


CART = (
    "INSERT INTO carts (id, uid, active_uid, state, message, fingerprint, file_count,"
    " created_at, updated_at, last_used_at) VALUES ({}, 'old', 'old', 'ready', '', 'f', 1, 0, 0, 0)"
)
OWNED = CART.replace("(id, uid,", "(id, owner, uid,").replace("VALUES ({},", "VALUES ({}, 'x',")


def test_schema_0005_gives_old_carts_no_owner_and_goes_back(db_url: str) -> None:
    """Old carts are everybody's (owner ""); downgrading purges owned carts, keeps the rest."""
    with schema_at(db_url, "0003") as (conn, config):
        conn.execute(sa.text(CART.format(1)))
        command.upgrade(config, "0005")
        assert conn.execute(sa.text("SELECT owner FROM carts")).scalar() == ""
        conn.execute(sa.text(OWNED.format(2)))  # the same id, another owner
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            conn.execute(sa.text(OWNED.format(3)))  # the same owner and id
        command.downgrade(config, "0003")
        rows = conn.execute(sa.text("SELECT id, active_uid, state FROM carts ORDER BY id"))
        assert [tuple(row) for row in rows] == [(1, "old", "ready"), (2, None, "deleted")]
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            conn.execute(sa.text(CART.format(4)))  # one namespace again


# --- the OpenAPI document's access-control answers are the service's own -----------------


def _documented(code: str) -> set[tuple[str, str, str]]:
    """(verb, path, example name) of every documented example of this status."""
    document = create_app().openapi()
    return {
        (verb.upper(), path, name)
        for path, operations in document["paths"].items()
        for verb, operation in operations.items()
        for media in operation["responses"].get(code, {}).get("content", {}).values()
        for name in media.get("examples", {})
    }


def _replay(
    code: str, clients: dict[str, tuple[httpx.Client, dict[str, str]]]
) -> set[tuple[str, str, str]]:
    """Send each documented example's request; its answer must carry that exact message."""
    document = create_app().openapi()
    replayed = set()
    for verb, path, name in _documented(code):
        client, headers = clients[name]
        response = client.request(verb, path.replace("{cart_id}", "c"), headers=headers)
        media = document["paths"][path][verb.lower()]["responses"][code]["content"]
        (documented,) = media.values()
        assert assert_error(response, int(code)) == documented["examples"][name]["value"][
            "message"
        ], (verb, path, name)
        replayed.add((verb, path, name))
    return replayed


def test_documented_401_examples_are_what_token_mode_answers(token_service: Service) -> None:
    client = token_service.client
    clients = {"missing": (client, {}), "invalid": (client, _bearer("not-a-token-of-anybody"))}
    documented = _documented("401")
    assert {name for _verb, _path, name in documented} == set(clients)
    assert {path for _verb, path, _name in documented} == {
        "/{cart_id}", "/{cart_id}/status", "/{cart_id}/events",
    }  # fmt: skip
    assert _replay("401", clients) == documented


def test_documented_403_examples_are_what_proxy_mode_answers(
    outsider: tuple[Service, httpx.Client],
) -> None:
    service, stranger = outsider
    clients = {
        "untrusted": (stranger, {"X-Remote-User": "alice"}),
        "no_identity": (service.client, {}),
    }
    documented = _documented("403")
    assert {name for _verb, _path, name in documented} == set(clients)
    assert _replay("403", clients) == documented
