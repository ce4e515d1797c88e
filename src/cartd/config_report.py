"""What `cartd config show` prints: the effective settings, where each came from, secrets masked.

An operator pastes this output into tickets and chat, so nothing secret may survive it:
fields named like a secret are masked whole, and any URL loses its password and the values
of secret-looking query parameters.  Masking goes by name pattern rather than by a list,
so that a setting added later is covered without anyone remembering to list it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import SecretBytes, SecretStr

from cartd.settings import Settings, env_names

MASK = "********"
_SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|api_?key|credential|private_?key", re.I)
# A field that names a file or a place holding a secret is not itself secret.
_NOT_SECRET_SUFFIX = ("_file", "_path", "_dir")


@dataclass(frozen=True)
class Row:
    variable: str
    aliases: list[str]
    value: Any
    source: str


def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not name.endswith(_NOT_SECRET_SUFFIX)


def mask_url(text: str) -> str:
    """`text` with a URL's password and secret query values masked; other text unchanged."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = urlencode(
        [(k, MASK if is_secret(k) else v) for k, v in parse_qsl(parts.query, True)], safe="*"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def shown(name: str, raw: Any, dumped: Any) -> Any:
    """The value as `config show` may print it (`dumped`: its JSON form)."""
    if isinstance(raw, SecretStr | SecretBytes) or (is_secret(name) and raw):
        return MASK
    if isinstance(dumped, str):
        return mask_url(dumped)
    return dumped


def rows(settings: Settings, sources: dict[str, str]) -> list[Row]:
    values = settings.model_dump(mode="json")
    return [
        Row(
            variable=env_names(name)[0],
            aliases=list(env_names(name)[1:]),
            value=shown(name, getattr(settings, name), values[name]),
            source=f"env {sources[name]}" if name in sources else "default",
        )
        for name in Settings.model_fields
    ]


def render_table(table: list[Row]) -> str:
    header = ("VARIABLE", "VALUE", "SOURCE")
    lines = [(r.variable, _text(r.value), r.source) for r in table]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(2)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in [header, *lines]
    )


def render_json(table: list[Row]) -> str:
    return json.dumps([asdict(r) for r in table], indent=2)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)
