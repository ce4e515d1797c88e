"""The images and compose files, checked without a Docker engine (none runs here).

What can be checked is checked for real: compose files against the Compose Specification's
own JSON schema (as vendored by check-jsonschema), the Dockerfiles with hadolint and a
Dockerfile parser, every variable compose and the image set for cartd against Settings,
and the two container commands (cartd's entrypoint, the archive's CMD) run as processes
with the image's own environment, only its paths moved into a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import sqlalchemy as sa
import yaml
from dockerfile_parse import DockerfileParser
from pydantic import AliasChoices

from cartd.db import migrate
from cartd.db.session import create_engine
from cartd.settings import Settings
from conftest import free_port, sync_url, wait_for
from reference_archive import place_file

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
COMPOSE_FILES = sorted(ROOT.glob("compose*.yaml"))
DOCKERFILE = ROOT / "Dockerfile"
ARCHIVE_DOCKERFILE = ROOT / "docker" / "archiveinterface" / "Dockerfile"
_FIELDS = {
    str(name): field
    for field, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, AliasChoices)
    for name in info.validation_alias.choices
}
# Variables an image may set that are not cartd's.
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@pytest.fixture(autouse=True)
def _no_settings_from_this_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings(...) also reads os.environ: only what the files under test set may count."""
    for name in _FIELDS:
        monkeypatch.delenv(name, raising=False)


def _compose_schema() -> Any:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def _compose_errors(document: Any) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    checker = validator(schema, format_checker=validator.FORMAT_CHECKER)
    return sorted(f"{list(e.absolute_path)}: {e.message}" for e in checker.iter_errors(document))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _interpolate(value: object) -> str:
    """What compose passes with an empty `.env`: `${VAR:-default}` becomes `default`."""
    return _INTERPOLATION.sub(lambda m: m[2] or "", str(value))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): _interpolate(v) for k, v in env.items()}


def _cartd_services(path: Path) -> dict[str, dict[str, Any]]:
    """Services running the cartd image: named cartd*, built from the root Dockerfile, or
    given CARTD_* variables (an override file such as compose.scale.yaml may do any)."""
    services = _load(path).get("services") or {}
    return {
        name: service
        for name, service in services.items()
        if name.startswith("cartd")
        or service.get("build") in (".", {"context": "."})
        or any(key.startswith("CARTD_") for key in _environment(service))
    }


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_follows_the_compose_specification(path: Path) -> None:
    assert _compose_errors(_load(path)) == []


def test_the_schema_check_catches_mistakes() -> None:
    document = _load(ROOT / "compose.yaml")
    typo = copy.deepcopy(document)
    typo["services"]["cartd"]["depends_on"]["db"]["condition"] = "service_happy"
    unknown = copy.deepcopy(document)
    unknown["services"]["db"]["helthcheck"] = unknown["services"]["db"].pop("healthcheck")
    assert _compose_errors(typo) != []
    assert any("helthcheck" in error for error in _compose_errors(unknown))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_variable_compose_sets_for_cartd_is_a_valid_setting(path: Path) -> None:
    services = _cartd_services(path)
    assert services or path.name != "compose.yaml"
    for name, service in services.items():
        env = _environment(service)
        unknown = sorted(set(env) - _FIELDS.keys())
        assert unknown == [], f"{path.name}: {name} sets {unknown}, which cartd ignores"
        settings = Settings.model_validate(env)  # raises on a value cartd would refuse
        # `KEY: ${KEY:-default}` passes an operator's .env through; its default must be
        # cartd's own, or compose would quietly change it.
        for key, raw in (service.get("environment") or {}).items():
            match = _INTERPOLATION.fullmatch(str(raw))
            if match and match[1] == key:
                field = _FIELDS[key]
                assert getattr(settings, field) == Settings.model_fields[field].default, key


def test_compose_wires_cartd_to_its_database_archive_and_volumes() -> None:
    document = _load(ROOT / "compose.yaml")
    services, volumes = document["services"], document["volumes"]
    cartd, db = services["cartd"], services["db"]
    env = _environment(cartd)
    assert db["image"].startswith("mariadb:")
    assert db["healthcheck"]["test"]
    assert cartd["depends_on"]["db"] == {"condition": "service_healthy"}
    # The image's entrypoint migrates, then serves: compose must not bypass it.
    assert "entrypoint" not in cartd
    assert cartd.get("command", ["serve"]) == ["serve"]
    database = urllib.parse.urlsplit(env["CARTD_DATABASE_URL"])
    db_env = _environment(db)
    assert (database.hostname, database.username, database.password, database.path) == (
        "db",
        db_env["MARIADB_USER"],
        db_env["MARIADB_PASSWORD"],
        "/" + db_env["MARIADB_DATABASE"],
    )
    archive_url = urllib.parse.urlsplit(env["CARTD_ARCHIVE_INTERFACE_URL"])
    assert (
        services[archive_url.hostname]["build"]["dockerfile"]
        == "docker/archiveinterface/Dockerfile"
    )
    archive_cmd = json.loads(_only(_stages(ARCHIVE_DOCKERFILE)[-1], "CMD"))
    assert archive_cmd[archive_cmd.index("-p") + 1] == str(archive_url.port)
    mounts = {m.split(":")[1]: m.split(":")[0] for m in cartd["volumes"]}
    assert mounts[env["CARTD_VOLUME_PATH"]] in volumes, "the cache must be a named volume"
    assert any(m.split(":")[0] in volumes for m in db["volumes"]), "MariaDB needs a named volume"


def _stages(path: Path) -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for instruction in DockerfileParser(str(path)).structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages and instruction["instruction"] != "COMMENT":
            stages[-1].append(instruction)
    return stages


def _only(stage: list[dict[str, Any]], name: str) -> str:
    values = [i["value"] for i in stage if i["instruction"] == name]
    assert len(values) == 1, f"expected one {name}, found {values}"
    return str(values[0])


def _image_env(path: Path) -> dict[str, str]:
    return DockerfileParser(str(path)).envs


def test_dockerfile_builds_from_the_lock_and_runs_slim_and_unprivileged() -> None:
    build, final = _stages(DOCKERFILE)[0], _stages(DOCKERFILE)[-1]
    assert _only(build, "FROM").endswith(" AS build")
    assert any("-c requirements/constraints.txt" in i["value"] for i in build)
    assert _only(final, "FROM") == "python:3.11-slim"
    assert any(i["value"].startswith("--from=build ") for i in final if i["instruction"] == "COPY")
    user = _only(final, "USER").split(":")[0]
    assert user not in ("root", "0")
    assert any(f"--uid {user} " in i["value"] for i in final if i["instruction"] == "RUN")
    env = _image_env(DOCKERFILE)
    assert set(env) - NOT_SETTINGS <= _FIELDS.keys()
    settings = Settings.model_validate({k: v for k, v in env.items() if k in _FIELDS})
    assert settings.host == "0.0.0.0"
    assert _only(final, "EXPOSE") == str(settings.port)
    assert str(settings.volume_path) in json.loads(_only(final, "VOLUME"))
    assert _only(final, "HEALTHCHECK").endswith('CMD ["cartd", "healthcheck"]')
    entrypoint = json.loads(_only(final, "ENTRYPOINT"))
    copied = [i["value"].split() for i in final if i["instruction"] == "COPY"]
    assert [c[-2:] for c in copied if c[-1].endswith(entrypoint[0])] == [
        ["docker/entrypoint.sh", f"/usr/local/bin/{entrypoint[0]}"]
    ]
    assert json.loads(_only(final, "CMD")) == ["serve"]


@pytest.mark.parametrize("path", [DOCKERFILE, ARCHIVE_DOCKERFILE], ids=lambda p: str(p.parent))
def test_dockerfile_copies_only_what_exists(path: Path) -> None:
    for stage in _stages(path):
        for copied in (i["value"].split() for i in stage if i["instruction"] == "COPY"):
            if any(word.startswith("--from=") for word in copied):
                continue
            for source in (w for w in copied[:-1] if not w.startswith("--")):
                assert (ROOT / source).exists(), f"{path}: COPY {source}: no such file"


def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    clean = subprocess.run(
        [str(BIN / "hadolint"), str(DOCKERFILE), str(ARCHIVE_DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /srv && pip install cartd\n")
    caught = subprocess.run(
        [str(BIN / "hadolint"), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert caught.returncode != 0
    assert "DL3007" in caught.stdout  # `latest`


def _moved(env: dict[str, str], image_root: str, here: Path) -> dict[str, str]:
    """The image's environment with its paths under `image_root` moved to `here`."""
    return {k: v.replace(image_root, str(here)) for k, v in env.items()}


@pytest.fixture
def process_group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started in their own session, killed whole afterwards (an `sh` that did
    not exec would otherwise leave its cartd behind)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _container_env(tmp_path: Path) -> dict[str, str]:
    image = _moved(_image_env(DOCKERFILE), "/srv/cartd", tmp_path)
    (tmp_path / "db").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTD_")}
    return env | image | {"PATH": f"{BIN}:{os.environ['PATH']}", "CARTD_PORT": str(free_port())}


def test_entrypoint_upgrades_then_execs_cartd_serve(
    tmp_path: Path, process_group: list[subprocess.Popen[bytes]]
) -> None:
    env = _container_env(tmp_path)
    engine = create_engine(Settings(database_url=env["CARTD_DATABASE_URL"]))
    previous = [script.revision for script in migrate.scripts().walk_revisions()][1]

    async def make_behind() -> None:
        await migrate.upgrade(engine)
        await migrate.downgrade(engine, previous)

    asyncio.run(make_behind())
    log = tmp_path / "entrypoint.log"
    command = json.loads(_only(_stages(DOCKERFILE)[-1], "CMD"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["sh", str(ROOT / "docker" / "entrypoint.sh"), *command],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process_group.append(proc)
    url = f"http://127.0.0.1:{env['CARTD_PORT']}/"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, "cartd serve behind the entrypoint", timeout=60)
    status = asyncio.run(migrate.status(engine))
    assert status.revision == status.head
    text = log.read_text()
    assert text.index(f"database schema upgraded: {previous} -> {status.head}") < text.index(
        "Application startup complete"
    )
    assert f"Uvicorn running on http://0.0.0.0:{env['CARTD_PORT']}" in text
    # The image's HEALTHCHECK command, in the image's environment, against the real service.
    probe = subprocess.run(
        ["cartd", "healthcheck"], env=env, capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "200" in probe.stdout, probe.stdout
    # exec: the shell's process became `cartd serve`, so SIGTERM from the container runtime
    # reaches cartd itself and it shuts down gracefully (then ends by that signal).
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert [Path(cmdline[1].decode()).name, cmdline[2].decode()] == ["cartd", "serve"], cmdline
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, log.read_text()
    assert "shutting down: staging stopped" in log.read_text()
    asyncio.run(engine.dispose())


def test_entrypoint_stops_when_the_upgrade_fails(tmp_path: Path) -> None:
    """A schema the image cannot upgrade (a newer cartd's) must not be served anyway."""
    env = _container_env(tmp_path)
    engine = create_engine(Settings(database_url=env["CARTD_DATABASE_URL"]))
    asyncio.run(migrate.upgrade(engine))
    with sa.create_engine(sync_url(env["CARTD_DATABASE_URL"])).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    refused = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "a newer cartd upgraded it" in refused.stderr, refused.stderr
    # `set -e` stopped the script at the upgrade: `cartd serve` never ran at all.
    assert refused.stderr.startswith("cartd db failed: "), refused.stderr
    assert "cartd serve" not in refused.stderr


def test_entrypoint_runs_other_commands_as_they_are(tmp_path: Path) -> None:
    env = _container_env(tmp_path)
    shown = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), "config", "show"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert ["CARTD_HOST", "0.0.0.0", "env", "CARTD_HOST"] in [
        line.split() for line in shown.stdout.splitlines()
    ]
    assert not (tmp_path / "db" / "cartd.db").exists(), "config show must not migrate"


def test_archive_image_command_serves_the_reference_archive(
    tmp_path: Path, process_group: list[subprocess.Popen[bytes]]
) -> None:
    """The archive image's CMD and config files, run by the reference venv's interpreter."""
    venv = ROOT / ".venv-archive" / "bin"
    configs = ROOT / "docker" / "archiveinterface"
    env = _moved(_image_env(ARCHIVE_DOCKERFILE), "/etc/archiveinterface", configs)
    port = free_port()
    argv = json.loads(_only(_stages(ARCHIVE_DOCKERFILE)[-1], "CMD"))
    argv = shlex.split(
        " ".join(argv).replace("/srv/archive", str(tmp_path)).replace("-p 8080", f"-p {port}")
    )
    place_file(tmp_path, "1/a.txt", b"hello")
    proc = subprocess.Popen(
        [str(venv / argv[0]), *argv[1:]],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    process_group.append(proc)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, "pacifica-archiveinterface", timeout=60)
    head = httpx.head(url + urllib.parse.quote("1/a.txt", safe=""), timeout=10)
    assert (head.status_code, head.headers["X-Content-Length"]) == (204, "5")
