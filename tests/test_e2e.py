from __future__ import annotations

import io
import tarfile

from archive_server import ArchiveServer
from conftest import Service, entry


def test_cart_round_trip(service: Service, archive: ArchiveServer) -> None:
    archive.add_file("a", b"alpha", mtime=1444938166.5)
    archive.add_file("dir/b", b"beta" * 1000)
    response = service.post("c1", [entry("a", "/a.txt", b"alpha"),
                                    entry("dir/b", "x/y/b.bin", b"beta" * 1000, "md5")])
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
