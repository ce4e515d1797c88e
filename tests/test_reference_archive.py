"""cartd against the real pacifica-archiveinterface 0.4.2 (posix), run as a subprocess.

Its virtualenv is built by the test command (see the Makefile) from
requirements/archiveinterface.txt; a missing venv is an error, not a skip.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Service, entry
from reference_archive import place_file, reference_archive

VENV = Path(os.environ.get("CARTD_TEST_ARCHIVE_VENV", Path(__file__).parents[1] / ".venv-archive"))


@pytest.fixture
def reference_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if not (VENV / "bin" / "pacifica-archiveinterface").exists():
        pytest.fail(f"reference archive venv missing at {VENV}: run `make test` to build it")
    prefix = tmp_path / "posix"
    prefix.mkdir()
    with reference_archive(prefix, VENV) as url:
        yield url, prefix


def test_stages_and_serves_from_reference_archive(
    make_service: object, reference_url: tuple[str, Path]
) -> None:
    url, prefix = reference_url
    files = {
        "foo.txt": b"foo\n" * 1000,
        "1/2/bar.csv": os.urandom(3 * 1024 * 1024 + 7),
        "1234": b"",
    }
    for file_id, data in files.items():
        place_file(prefix, file_id, data, mtime=1444938166.5)
    # The reference server corrupts concurrent GETs, so sites run it with one connection.
    service: Service = make_service(archive_interface_url=url, archive_concurrency=1)  # type: ignore[operator]
    cart = [
        entry("foo.txt", "/foo.txt", files["foo.txt"]),
        entry("1/2/bar.csv", "a/bar.csv", files["1/2/bar.csv"], "md5"),
        entry(1234, "empty", b"", "sha256"),
    ]
    assert service.post("ref", cart).status_code == 201
    assert service.wait_settled("ref", timeout=60) == (204, "ready", "")
    body = service.client.get("/ref", params={"filename": "ref.tar"}).content
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
        assert tar.getmember("ref/foo.txt").mtime == 1444938166
    assert {k: hashlib.sha256(v).hexdigest() for k, v in got.items()} == {
        "ref/foo.txt": hashlib.sha256(files["foo.txt"]).hexdigest(),
        "ref/a/bar.csv": hashlib.sha256(files["1/2/bar.csv"]).hexdigest(),
        "ref/empty": hashlib.sha256(b"").hexdigest(),
    }


def test_missing_file_on_reference_archive_fails_the_cart(
    make_service: object, reference_url: tuple[str, Path]
) -> None:
    url, _prefix = reference_url
    service: Service = make_service(  # type: ignore[operator]
        archive_interface_url=url, archive_concurrency=1, archive_unreachable_timeout=1.0
    )
    assert service.post("gone", [entry("nope.txt", "nope.txt", b"x")]).status_code == 201
    code, state, message = service.wait_settled("gone", timeout=60)
    assert (code, state) == (500, "error")
    assert message.startswith("Failed to pull file(")
    assert "nope.txt" in message
