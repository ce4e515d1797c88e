"""Access control (CARTD_AUTH=token|proxy) through real HTTP, and cart ownership."""

from __future__ import annotations

import pytest

from cartd.tokens import TokenFileError, parse_tokens

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
TOKENS = f"# cartd tokens\n\nalice:{ALICE}\n  bob : {BOB}  \n"


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
