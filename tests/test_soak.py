"""The fault-injection soak, CI size (bench/soak.py runs 50 carts of 1-200 files)."""

from __future__ import annotations

import pytest

from archive_server import ArchiveServer
from conftest import Service, entry
from soak import Soak, SoakConfig, assert_volume_clean

SEED = 3031


@pytest.mark.timeout(300)
def test_soak_under_random_faults(service: Service, archive: ArchiveServer) -> None:
    config = SoakConfig(seed=SEED, carts=12, max_files=40, wrong_files=2, deadline=180)
    print(f"soak seed {SEED}")
    report = Soak(service.client, archive, config).run()
    print(report)
    assert report.errored == config.wrong_files
    assert report.ready == config.carts - config.wrong_files
    # The faults were real and about as frequent as asked for.
    assert 0.1 < report.faults_injected / report.archive_requests < 0.3, report
    assert {kind.split()[1] for kind in report.faults} >= {"500", "503", "drop", "truncate"}
    assert_volume_clean(service.volume, service.client)


def test_checksum_error_names_the_file_in_the_status(
    service: Service, archive: ArchiveServer
) -> None:
    """The cart message keeps pacifica-cartd's exact text (clients match on it); the
    JSON status is where the failing file is named, with its cause."""
    archive.add_file("lying-file", b"what the archive holds")
    fileids = [entry("lying-file", "f.txt", b"what the client expects")]
    assert service.post("c", fileids).status_code == 201
    code, status, message = service.wait_settled("c")
    assert (code, status) == (500, "error")
    assert message == "Failed to pull file(File hash does not match provided hash)"
    failed = [f for f in service.status("c")["files"] if f["state"] == "error"]
    assert [(f["id"], f["error"]) for f in failed] == [
        ("lying-file", "File hash does not match provided hash")
    ]
