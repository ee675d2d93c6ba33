"""Render the README's configuration table from service/config.py (``make readme``).

``python scripts/render_readme.py`` rewrites the table in place; ``--check`` exits 1 if it is out of
date (tests/test_config.py runs the same comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.cli import flag  # noqa: E402
from service.config import Settings  # noqa: E402

README = ROOT / "README.md"
START, END = "<!-- settings:start (make readme) -->", "<!-- settings:end -->"


def table() -> str:
    rows = ["| Variable | Default | Flag | Meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default).lower()
        rows.append(f"| `{Settings.env_name(name)}` | `{default}` | `{flag(name)}` | {field.description} |")
    return "\n".join(rows)


def rendered(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    new = rendered(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md's configuration table is out of date: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
