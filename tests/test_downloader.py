"""The real pacifica-downloader 0.4.1 client, unchanged, against a running cartd."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pacifica.downloader import Downloader

from archive_server import ArchiveServer
from conftest import Service


def _file(file_id: str, name: str, subdir: str, data: bytes) -> dict[str, str]:
    return {
        "destinationTable": "Files",
        "_id": file_id,
        "name": name,
        "subdir": subdir,
        "hashtype": "sha1",
        "hashsum": hashlib.sha1(data).hexdigest(),
    }


def test_pacifica_downloader_extracts_exact_bytes(
    service: Service, archive: ArchiveServer, tmp_path: Path
) -> None:
    top = b"top level file\n"
    nested = os.urandom(5 * 1024 * 1024 + 3)
    archive.add_file("103", top)
    archive.add_file("104", nested, tape_delay=0.3)
    event = {
        "data": [
            _file("103", "foo.txt", "", top),
            _file("104", "bar.bin", "a/b", nested),
            {"destinationTable": "Transactions", "_id": 7},
        ]
    }
    destination = tmp_path / "download"
    Downloader(cart_api_url=service.url).cloudevent(
        str(destination), event, filename="my_cart.tar", timeout=60
    )
    assert (destination / "my_cart" / "foo.txt").read_bytes() == top
    assert (destination / "my_cart" / "a" / "b" / "bar.bin").read_bytes() == nested
    assert archive.count("GET", "104") == 1
