"""`cartd-client get CART.json -o DIR`: post a cart, watch it stage, download, extract, verify.

It speaks the pacifica-cartd 0.7.0 wire protocol (POST, HEAD, GET ?filename=), so it works
against any compatible server, and uses cartd's extras where the server has them:
`/events` for a live staging bar (else it polls HEAD, honouring Retry-After), and ranged
requests with If-Range to resume an interrupted download (a server without them simply
sends the whole tar again).  The bundle is extracted with tarfile's "data" filter, which
refuses members that would escape DIR, and verified against the bundle's MANIFEST.sha256
when it has one, else against the checksums in CART.json.

Only the standard library and httpx: it must install and run where the service does not.
Exit status: 0 done, 1 the cart failed (refused, in error, deleted, or its bytes do not
verify), 2 usage, I/O or network errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

EXIT_OK, EXIT_CART, EXIT_USAGE = 0, 1, 2
TERMINAL = ("ready", "error")
MANIFEST = "MANIFEST.sha256"
ERRORS = "ERRORS.json"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
DESCRIPTION = "Post a cart to cartd, watch it stage, download, extract and verify it."
_MANIFEST_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) [ *](.+)")


class CartFailed(Exception):
    """The cart itself failed: the server refused it or reports it in error (exit 1)."""


class ClientError(Exception):
    """Usage, file system or network trouble, not the cart's fault (exit 2)."""


class Incomplete(Exception):
    """A download attempt ended early; the next attempt resumes where it stopped."""


@dataclass(frozen=True)
class Options:
    cart_file: Path
    out_dir: Path
    url: str
    name: str
    cart_id: str
    quiet: bool
    retries: int
    poll_max: float
    keep_tar: bool
    token: str = ""  # sent as a bearer token, for servers with CARTD_AUTH=token


# --- progress bar ----------------------------------------------------------------------------


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def render(label: str, done: int, total: int | None, note: str = "", width: int = 24) -> str:
    """One line of progress; without a known total it shows the count alone."""
    if total:
        fraction = min(max(done / total, 0.0), 1.0)
        filled = int(fraction * width)
        bar = "#" * filled + "-" * (width - filled)
        text = f"{label:<8} [{bar}] {fraction:4.0%}  {_mib(done)} / {_mib(total)}"
    else:
        text = f"{label:<8} {_mib(done)}"
    return f"{text}  {note}".rstrip()


class Bar:
    """Plain stderr rendering, redrawn at most ten times a second, silent off a terminal."""

    def __init__(self, label: str, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream
        self._drawn_at = 0.0
        self._width = 0

    def update(self, done: int, total: int | None, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn_at < 0.1):
            return
        self._drawn_at = now
        line = render(self.label, done, total, note)
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()


# --- posting and waiting -------------------------------------------------------------------


def load_cart(path: Path) -> tuple[bytes, list[dict[str, Any]]]:
    """The raw body to POST, and its file list for verification."""
    try:
        body = path.read_bytes()
        document = json.loads(body)
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ClientError(f"{path} is not JSON: {exc}") from None
    fileids = document.get("fileids") if isinstance(document, dict) else None
    if not isinstance(fileids, list) or not all(isinstance(f, dict) for f in fileids):
        raise ClientError(f'{path} has no "fileids" list of objects')
    return body, fileids


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else str(body)[:500]


def post_cart(http: httpx.Client, cart_id: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    response = http.post(f"/{cart_id}", content=body, headers=headers)
    if response.status_code in (200, 201):
        return
    if response.status_code in (401, 403):  # the credentials, not the cart
        raise ClientError(f"not authorised: {_message(response)} (see --token-file)")
    if 400 <= response.status_code < 500:
        raise CartFailed(f"the server refused the cart: {_message(response)}")
    raise ClientError(f"POST /{cart_id} answered {response.status_code}: {_message(response)}")


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from an SSE body; comments and ids are skipped."""
    kind, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _show_status(bar: Bar, status: dict[str, Any]) -> None:
    files = f"{status.get('files_staged', 0)}/{status.get('files_total', '?')} files"
    eta = status.get("eta_seconds")
    note = files if eta is None else f"{files}  ETA {eta:.0f}s"
    final = status.get("state") in TERMINAL
    bar.update(int(status.get("bytes_staged") or 0), status.get("bytes_total"), note, final)


def watch_events(http: httpx.Client, cart_id: str, bar: Bar) -> str | None:
    """Follow /events to a terminal state; None when the server has no usable stream."""
    try:
        with http.stream("GET", f"/{cart_id}/events", params={"files": "0"}) as response:
            kind = response.headers.get("content-type", "")
            if response.status_code != 200 or not kind.startswith("text/event-stream"):
                return None
            for event, data in _sse_events(response.iter_lines()):
                if event == "deleted":
                    raise CartFailed(f"cart {cart_id} was deleted while staging")
                if event != "status":
                    continue
                status = json.loads(data)
                _show_status(bar, status)
                if status.get("state") in TERMINAL:
                    return _settle(status.get("state"), status.get("message", ""))
    except (httpx.TransportError, ValueError):
        return None  # a broken stream is no verdict: HEAD polling takes over
    return None


def _settle(state: Any, message: str) -> str:
    if state == "error":
        raise CartFailed(message or "the cart is in error")
    return str(state)


def poll_head(http: httpx.Client, cart_id: str, bar: Bar, poll_max: float) -> str:
    """pacifica-downloader's loop: HEAD until X-Pacifica-Status leaves `staging`."""
    started, failures, delay = time.monotonic(), 0, 0.25
    while True:
        try:
            response = http.head(f"/{cart_id}")
            failures = 0
        except httpx.TransportError as exc:
            failures += 1
            if failures > 5:
                raise ClientError(f"lost the server while staging: {exc}") from None
            response = None
        if response is not None:
            state = response.headers.get("x-pacifica-status", "")
            message = response.headers.get("x-pacifica-message", "")
            if response.status_code == 404:
                raise CartFailed(message or f"cart {cart_id} not found")
            if state in TERMINAL or response.status_code == 500:
                return _settle(state if state in TERMINAL else "error", message)
            hint = response.headers.get("retry-after", "")
            delay = float(hint) if hint.isdigit() else min(delay * 2, poll_max)
        bar.update(0, None, f"staging, {time.monotonic() - started:.0f}s")
        time.sleep(min(max(delay, 0.05), poll_max))


def wait_ready(http: httpx.Client, cart_id: str, bar: Bar, poll_max: float) -> None:
    try:
        if watch_events(http, cart_id, bar) is None:
            poll_head(http, cart_id, bar, poll_max)
    finally:
        bar.close()


# --- downloading -----------------------------------------------------------------------------


def _etag_file(part: Path) -> Path:
    return part.with_name(part.name + ".etag")


def _resume_headers(part: Path) -> dict[str, str]:
    """Range + If-Range from a previous attempt, if it left bytes and a strong ETag."""
    headers = {"Accept-Encoding": "identity"}  # offsets count raw bytes
    etag_file = _etag_file(part)
    have = part.stat().st_size if part.exists() else 0
    if have and etag_file.exists():
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = etag_file.read_text().strip()
    return headers


def _body_start(response: httpx.Response, part: Path) -> tuple[int, int | None]:
    """Where this response's body goes in the file, and the whole tar's size if known."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        have = part.stat().st_size
        if match is None or int(match[1]) != have:
            part.unlink(missing_ok=True)
            raise Incomplete("the server sent a range we did not ask for")
        return have, int(match[3])
    length = response.headers.get("content-length")
    return 0, int(length) if length and length.isdigit() else None


def _check_response(response: httpx.Response, part: Path) -> bool:
    """Raise for answers that carry no tar; True when a 416 says the file is complete."""
    code = response.status_code
    if code in (200, 206):
        return False
    if code == 416:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if part.exists() and total.isdigit() and int(total) == part.stat().st_size:
            return True
        part.unlink(missing_ok=True)
        raise Incomplete("the saved part does not fit the bundle; starting over")
    response.read()
    if code in (404, 409):
        raise CartFailed(_message(response))
    if code == 202 or code >= 500:
        raise Incomplete(f"the server answered {code}: {_message(response)}")
    raise ClientError(f"download answered {code}: {_message(response)}")


def _save(response: httpx.Response, part: Path, bar: Bar) -> None:
    offset, total = _body_start(response, part)
    etag = response.headers.get("etag", "")
    if etag and not etag.startswith("W/"):
        _etag_file(part).write_text(etag)
    else:
        _etag_file(part).unlink(missing_ok=True)
    with part.open("ab" if offset else "wb") as handle:
        for chunk in response.iter_bytes():  # as received: a cut loses nothing buffered
            handle.write(chunk)
            bar.update(handle.tell(), total)
    size = part.stat().st_size
    bar.update(size, total, force=True)
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise Incomplete(f"got {size} of {total} bytes")


def fetch_once(http: httpx.Client, cart_id: str, name: str, part: Path, bar: Bar) -> None:
    """One GET: a whole tar, or the rest of one; raises Incomplete when it stops short."""
    params = {"filename": f"{name}.tar"}
    headers = _resume_headers(part)
    try:
        with http.stream("GET", f"/{cart_id}", params=params, headers=headers) as response:
            if not _check_response(response, part):
                _save(response, part, bar)
    except httpx.TransportError as exc:
        raise Incomplete(f"connection lost: {exc}") from None


def download(http: httpx.Client, cart_id: str, name: str, part: Path, options: Options) -> None:
    """Retry with backoff; every attempt after the first resumes from the saved bytes."""
    bar = Bar("download", not options.quiet and sys.stderr.isatty())
    try:
        for attempt in range(options.retries + 1):
            try:
                fetch_once(http, cart_id, name, part, bar)
                return
            except Incomplete as exc:
                if attempt == options.retries:
                    raise ClientError(f"download failed after {attempt + 1} tries: {exc}") from None
                if not options.quiet:
                    print(f"\ncartd-client: {exc}; resuming", file=sys.stderr)
                time.sleep(min(0.5 * 2**attempt, 10.0))
    finally:
        bar.close()


# --- extracting and verifying ----------------------------------------------------------------


def _digest(path: Path, hashtype: str) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, hashtype).hexdigest()


def _inside(top: Path, relative: str) -> Path | None:
    """The file a listed path names, or None if it would lie outside the bundle."""
    target = (top / relative).resolve()
    return target if target.is_relative_to(top.resolve()) else None


def read_manifest(path: Path) -> dict[str, str]:
    """path -> sha256 from `sha256sum` output (escaped names included, comments skipped)."""
    listed: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _MANIFEST_LINE.fullmatch(line)
        if match is None:
            continue
        name = match[3]
        if match[1]:  # GNU escapes names holding a backslash or newline
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        listed[name] = match[2].lower()
    return listed


def verify_manifest(top: Path, cart_paths: Sequence[str]) -> list[str]:
    listed = read_manifest(top / MANIFEST)
    problems = [f"{p}: not in {MANIFEST}" for p in cart_paths if p not in listed]
    if problems and (top / ERRORS).exists():
        problems = []  # a partial cart: ERRORS.json lists what is missing and why
    for relative, expected in listed.items():
        target = _inside(top, relative)
        if target is None or not target.is_file():
            problems.append(f"{relative}: missing")
        elif _digest(target, "sha256") != expected:
            problems.append(f"{relative}: sha256 does not match {MANIFEST}")
    return problems


def verify_cart(top: Path, fileids: Sequence[dict[str, Any]]) -> list[str]:
    problems = []
    for entry in fileids:
        relative = str(entry.get("path", "")).removeprefix("/")
        target = _inside(top, relative)
        hashtype = str(entry.get("hashtype", "")).lower()
        if target is None or not target.is_file():
            problems.append(f"{relative}: missing")
        elif hashtype not in hashlib.algorithms_available:
            problems.append(f"{relative}: cannot check hashtype {hashtype!r}")
        elif _digest(target, hashtype) != str(entry.get("hashsum", "")).lower():
            problems.append(f"{relative}: {hashtype} does not match CART.json")
    return problems


def extract_and_verify(tar: Path, top: Path, fileids: Sequence[dict[str, Any]]) -> str:
    """Unpack with the "data" filter (no escapes, no devices, sane modes), then verify."""
    try:
        with tarfile.open(tar) as bundle:
            bundle.extractall(top.parent, filter="data")
    except tarfile.TarError as exc:
        raise CartFailed(f"the bundle is not a valid tar: {exc}") from None
    paths = [str(e.get("path", "")).removeprefix("/") for e in fileids]
    if (top / MANIFEST).is_file():
        how, problems = MANIFEST, verify_manifest(top, paths)
    else:
        how, problems = "CART.json", verify_cart(top, fileids)
    if (top / ERRORS).is_file():
        print(f"cartd-client: partial cart, see {top / ERRORS}", file=sys.stderr)
    if problems:
        raise CartFailed("verification failed:\n  " + "\n  ".join(problems[:20]))
    return how


# --- the command ---------------------------------------------------------------------------


def get(options: Options) -> Path:
    """The whole `get`: returns the directory the cart was extracted into."""
    body, fileids = load_cart(options.cart_file)
    top = options.out_dir / options.name
    if top.exists():
        raise ClientError(f"{top} already exists; remove it or choose another --name")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    part = options.out_dir / f"{options.name}.tar.part"
    timeout = httpx.Timeout(30.0, read=120.0)
    auth = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    with httpx.Client(base_url=options.url, timeout=timeout, headers=auth) as http:
        post_cart(http, options.cart_id, body)
        staging = Bar("staging", not options.quiet and sys.stderr.isatty())
        wait_ready(http, options.cart_id, staging, options.poll_max)
        download(http, options.cart_id, options.name, part, options)
    tar = part.with_name(f"{options.name}.tar")
    part.replace(tar)
    _etag_file(part).unlink(missing_ok=True)
    how = extract_and_verify(tar, top, fileids)
    if not options.keep_tar:
        tar.unlink()
    if not options.quiet:
        print(f"{top}: {len(fileids)} files, verified against {how}")
    return top


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cartd-client", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("get", help="stage, download, extract and verify a cart")
    command.add_argument("cart", type=Path, help="CART.json: {'fileids': [...]}")
    command.add_argument("-o", "--output", type=Path, required=True, help="directory")
    command.add_argument("--url", default="http://127.0.0.1:8081", help="cartd base URL")
    command.add_argument("--name", help="bundle name (default: CART.json's stem)")
    command.add_argument("--cart-id", help="cart id to use (default: a new UUID)")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    command.add_argument("--retries", type=int, default=5, help="download retries (5)")
    command.add_argument("--poll-max", type=float, default=10.0, help="longest HEAD poll wait")
    command.add_argument("--keep-tar", action="store_true", help="keep DIR/NAME.tar")
    command.add_argument(
        "--token-file", type=Path, help="file holding a bearer token (servers with CARTD_AUTH)"
    )
    return parser


def _token(path: Path | None) -> str:
    """The file's first line that is not blank or a comment; a file keeps it out of `ps`."""
    if path is None:
        return ""
    lines = [line.strip() for line in path.read_text().splitlines()]
    token = next((line for line in lines if line and not line.startswith("#")), "")
    if not token or any(c.isspace() for c in token):
        raise ClientError(f"--token-file {path} holds no token")
    return token


def _options(args: argparse.Namespace) -> Options:
    name = (args.name or args.cart.stem).removesuffix(".tar")
    if not name or any(c in name for c in "/\\") or not name.isprintable():
        raise ClientError(f"--name {name!r} must be a plain file name")
    if args.retries < 0 or args.poll_max <= 0:
        raise ClientError("--retries must be >= 0 and --poll-max > 0")
    return Options(
        cart_file=args.cart,
        out_dir=args.output,
        url=args.url.rstrip("/"),
        name=name,
        cart_id=args.cart_id or str(uuid.uuid4()),
        quiet=args.quiet,
        retries=args.retries,
        poll_max=args.poll_max,
        keep_tar=args.keep_tar,
        token=_token(args.token_file),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        get(_options(args))
    except CartFailed as exc:
        print(f"cartd-client: {exc}", file=sys.stderr)
        return EXIT_CART
    except (ClientError, OSError, httpx.HTTPError) as exc:
        print(f"cartd-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
