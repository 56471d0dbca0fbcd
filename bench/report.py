"""What every bench does with its summary: one JSON object, printed, and written to --out when given."""
from __future__ import annotations

import json
from pathlib import Path


def report(summary: dict, out: Path | None) -> None:
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
    print(text)
