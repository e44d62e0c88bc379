"""The project stands alone: no file in the repository refers to anything outside it.

A user's clone has nothing beside it, so the README, the tests, the benchmark and CI must not
point at a sibling directory or at the machine the project was written on.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|/work/|shared/bench|\bSPEC\.md|REAL-COMPONENTS|STYLE\.md|seeds/|"
                     r"parent\s*/\s*[\"']shared")


def tracked() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_refers_outside_the_repository():
    names = tracked()
    assert "README.md" in names and "tests/perf/loadgen.c" in names
    found = []
    for name in names:
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and name != "tests/test_standalone.py":   # its pattern names them
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_check_would_see_a_reference():
    # Put together here, so that this file does not itself hold what it looks for.
    kit = "shared"
    assert OUTSIDE.search(f"build it from ../{kit}/bench")
    assert OUTSIDE.search(f'ap.add_argument("--bench", default=str(REPO.parent / "{kit}" / "bench"))')
