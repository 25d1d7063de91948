"""The README's job example runs as written (so the front door cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

from fanout import coordinator
from fanout.backends.base import Backend, RunState
from support.helpers import drain

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_job_example_runs(mem: Backend, tmp_path: Path) -> None:
    text = README.read_text()
    match = re.search(r"```python\n(# my_job\.py.*?)```", text, re.S)
    assert match, "the README lost its my_job.py example"
    job = tmp_path / "my_job.py"
    job.write_text(match.group(1))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox\njumps over\n")
    (docs / "b.txt").write_text("lazy dogs\n")
    (docs / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # as docs/ has: not text
    run_id = coordinator.submit(mem, str(job), {"source": str(docs), "min_length": 4}).run_id
    assert drain(mem, run_id).state == RunState.SUCCEEDED
    got = sorted(
        (Path(r["file"]).name, r["line"], r["word"], r["length"])
        for r in coordinator.committed_records(mem, run_id)
    )
    assert got == [
        ("a.txt", 1, "brown", 5),
        ("a.txt", 1, "quick", 5),
        ("a.txt", 2, "jumps", 5),
        ("a.txt", 2, "over", 4),
        ("b.txt", 1, "dogs", 4),
        ("b.txt", 1, "lazy", 4),
    ]
