"""The documentation builds (``mkdocs build --strict``: no broken link, missing page or docstring
that fails to render) and every Python snippet in it runs.

Snippets are the ```` ```python ```` blocks of ``README.md`` and ``docs/**/*.md``, run in order, one
process per page, in a temporary folder, on tiny models they build from configs. A block whose
first line is ``# not run: <reason>`` is shown only (it needs a GPU, a server or a long run).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets(page: pathlib.Path) -> list[str]:
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    return [b for b in blocks if not b.lstrip().startswith("# not run:")]


def test_the_site_builds_strictly(tmp_path: pathlib.Path) -> None:
    mkdocs = pathlib.Path(sys.executable).with_name("mkdocs")
    assert mkdocs.exists(), "mkdocs is missing: `make test` installs it (the test extra)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page: pathlib.Path, tmp_path: pathlib.Path) -> None:
    code = "\n\n".join(snippets(page))
    script = tmp_path / "snippets.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "tests"),
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, (
        f"{page.name}: a snippet failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
