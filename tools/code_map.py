"""The module listing of docs/layout.md ("Each module, with the first line of its docstring"), made from
the code, so that the code map cannot drift from it (tests/test_layers.py compares them).

    python tools/code_map.py           print the listing
    python tools/code_map.py --write   replace the listing in docs/layout.md
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / "docs" / "layout.md"
# Packages top down, as docs/layout.md's table has them; a package not named here comes last.
ORDER = ["", "sweep", "config", "data", "parallel", "models", "models/timm", "models/open_clip", "models/transformers", "losses", "eval", "train", "stages",
         "search", "plan"]
WIDTH = 120


def first_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def listing() -> str:
    root = REPO / "pipeline"
    folders = sorted({str(p.parent.relative_to(root)).replace(".", "") for p in root.rglob("*.py")},
                     key=lambda f: (ORDER.index(f) if f in ORDER else len(ORDER), f))
    lines = []
    for folder in folders:
        lines.append(f"pipeline/{folder + '/' if folder else ''}")
        for path in sorted((root / folder).glob("*.py")):
            if path.name != "__init__.py" or folder in ("sweep",):
                lines.append(f"  {path.name:<22} {first_line(path)}"[:WIDTH].rstrip())
    return "\n".join(lines)


def documented() -> str:
    text = LAYOUT.read_text()
    start = text.index("```\npipeline/") + len("```\n")
    return text[start:text.index("\n```", start)]


def main(argv: list[str]) -> int:
    if "--write" in argv:
        LAYOUT.write_text(LAYOUT.read_text().replace(documented(), listing()))
    else:
        print(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
