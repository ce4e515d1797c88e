from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

from archive_server import ArchiveServer
from conftest import Service, entry


def test_cart_round_trip(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("a", b"alpha", mtime=1444938166.5)
    archive.add_file("dir/b", b"beta" * 1000)
    response = service.post(
        "c1", [entry("a", "/a.txt", b"alpha"), entry("dir/b", "x/y/b.bin", b"beta" * 1000, "md5")]
    )
    assert response.status_code == 201
    assert service.wait_settled("c1") == (204, "ready", "")
    download = service.client.get("/c1", params={"filename": "mine.tar"})
    assert download.status_code == 200
    assert int(download.headers["content-length"]) == len(download.content)
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        names = tar.getnames()
        assert names == ["mine", "mine/a.txt", "mine/x", "mine/x/y", "mine/x/y/b.bin"]
        member = tar.getmember("mine/a.txt")
        assert member.mtime == 1444938166
        assert tar.extractfile(member).read() == b"alpha"  # type: ignore[union-attr]


def test_concurrent_completions_make_the_cart_ready(
    make_service: object, archive: ArchiveServer
) -> None:
    """Many files finishing at once must not each think another is still staging."""
    service: Service = make_service(fetch_concurrency=16)  # type: ignore[operator]
    cart = []
    for number in range(300):
        data = f"file {number}\n".encode()
        archive.add_file(f"f{number}", data)
        cart.append(entry(f"f{number}", f"d{number % 7}/f{number}.txt", data))
    assert service.post("many", cart).status_code == 201
    assert service.wait_settled("many", timeout=60) == (204, "ready", "")
    status = service.status("many")
    assert status["files_staged"] == 300


def test_concurrent_identical_posts_create_one_cart(
    service: Service, archive: ArchiveServer
) -> None:
    archive.add_file("same", b"same bytes")
    cart = [entry("same", "same.txt", b"same bytes")]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: service.post("race", cart).status_code, range(8)))
    assert codes == [201] * 8
    assert service.wait_settled("race") == (204, "ready", "")
    assert archive.count("GET", "same") == 1


def test_concurrent_different_posts_one_wins(service: Service, archive: ArchiveServer) -> None:
    for number in range(6):
        archive.add_file(f"v{number}", f"version {number}".encode())

    def post(number: int) -> int:
        data = f"version {number}".encode()
        return service.post("contested", [entry(f"v{number}", "v.txt", data)]).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(post, range(6)))
    assert codes == [201] + [409] * 5
