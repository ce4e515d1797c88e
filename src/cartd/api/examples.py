"""Example values for the OpenAPI document, kept true by tests/test_openapi.py.

The error messages are the service's own for the request their name describes, and the
bodies validate against the models they illustrate, so a client author can rely on them.
"""

from __future__ import annotations

from typing import Any

_FOO = {
    "id": "foo.txt",
    "path": "1/2/3/foo.txt",
    "hashtype": "sha1",
    "hashsum": "f572d396fae9206628714fb2ce00f72e94f2258f",
}
CART_BODIES: dict[str, Any] = {
    "pacifica": {
        "summary": "As pacifica-downloader sends it",
        "value": {
            "fileids": [
                _FOO,
                {
                    "id": 1234,
                    "path": "/a/bar.csv",
                    "hashtype": "md5",
                    "hashsum": "d41d8cd98f00b204e9800998ecf8427e",
                },
            ]
        },
    },
    "options": {
        "summary": "Beyond 0.7.0: a ttl, a manifest, and partial carts",
        "value": {"fileids": [_FOO], "ttl": 86400, "manifest": True, "allow_partial": True},
    },
}

INVALID_CART_ID = (
    "invalid cart id 'a b': use 1-128 characters from [A-Za-z0-9._~-], not '.' or '..'"
)
NOT_FOUND = "No cart with uid my-cart found"
GONE = "The cart does not exist or has already been deleted"
INVALID_BODY = {
    "json": "request body is not valid JSON: Expecting value: line 1 column 1 (char 0)",
    "path": "fileids[0].path: path '../x' has a '..' segment; it must be relative and normalised",
    "hashtype": "fileids[0].hashtype: hashtype 'sha7' is not a supported hashlib algorithm",
    "empty": "fileids: List should have at least 1 item after validation, not 0",
}
CONFLICT = "cart my-cart already exists with a different file list or options"
TOO_LARGE = "request body larger than 67108864 bytes"
BAD_FORMAT = "invalid request: query.format: Input should be 'tar' or 'zip'"
BAD_FILES = (
    "invalid request: query.files: Input should be a valid boolean, unable to interpret input"
)
BAD_FILENAME = "filename must not contain '/', '\\' or control characters"
FAILED = "Failed to pull file(File hash does not match provided hash)"
MANIFEST_CLASH = "cart path 'MANIFEST.sha256' is where the manifest would go; ask without it"
PAST_END = "range 'bytes=20480-' starts past the end of a 10240-byte bundle"
STATUS = {
    "cart_id": "my-cart",
    "state": "staging",
    "message": "",
    "created_at": 1764316800.0,
    "updated_at": 1764316801.2,
    "ready_at": None,
    "last_used_at": 1764316830.5,
    "expires_at": None,
    "files_total": 2,
    "files_staged": 1,
    "files_error": 0,
    "bytes_total": 3145728,
    "bytes_staged": 2097152,
    "files_waiting": 0,
    "files_staging": 1,
    "eta_seconds": 4.5,
    "files": [
        {
            "id": "foo.txt",
            "path": "1/2/3/foo.txt",
            "state": "staged",
            "size": 1048576,
            "bytes_staged": 1048576,
            "error": "",
            "attempts": 1,
        },
        {
            "id": "1234",
            "path": "a/bar.csv",
            "state": "staging",
            "size": 2097152,
            "bytes_staged": 1048576,
            "error": "",
            "attempts": 1,
        },
    ],
}

# Access control (CARTD_AUTH=token | proxy): the answers before any cart is looked at.
AUTH_REQUIRED = "authentication required: send Authorization: Bearer <token>"
AUTH_INVALID = "invalid credentials"
PROXY_ONLY = "access control is on: requests must come through the proxy"
PROXY_NO_IDENTITY = "the proxy sent no usable X-Remote-User identity"
