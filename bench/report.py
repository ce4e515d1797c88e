"""How every benchmark reports: one JSON line on stdout, and the same line in `--out` if given.

One format means results from different runs and scripts can be collected with `cat`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
