"""Re-run the documentation snippets and paste their output into the pages.

Each page marks a snippet with ``<!-- snippet: NAME -->`` ... ``<!-- /snippet -->``; this script replaces the
block with the code of ``docs/snippets/NAME`` (a ``.py`` or ``.sh`` file) and what it prints (stdout and stderr,
in order). Run it after changing the package or a snippet: ``python docs/snippets/render.py [PAGE.md ...]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
SNIPPETS = DOCS / "snippets"
BLOCK = re.compile(r"<!-- snippet: (\S+) -->\n.*?<!-- /snippet -->", re.S)


def render(name: str) -> str:
    path = SNIPPETS / name
    code = path.read_text().strip()
    cmd, lang = (["bash", path.name], "bash") if path.suffix == ".sh" else ([sys.executable, path.name], "python")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=SNIPPETS, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        raise SystemExit(f"snippet {name} failed:\n{run.stdout}")
    return (
        f"<!-- snippet: {name} -->\n```{lang}\n{code}\n```\n\nOutput:\n\n```text\n{run.stdout.rstrip()}\n```\n"
        "<!-- /snippet -->"
    )


def main(pages: list[str]) -> None:
    """Render every page, or only ``pages`` (names like ``prune.md``)."""
    for page in sorted(DOCS.glob("*.md")):
        if pages and page.name not in pages:
            continue
        text = page.read_text()
        new = BLOCK.sub(lambda m: render(m.group(1)), text)
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(DOCS.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
