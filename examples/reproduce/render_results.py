#!/usr/bin/env python
"""Fill the results-page template with the tables a reproduce run computed (no number typed in).

    python examples/reproduce/render_results.py --report runs/reproduce/full/report \\
        --template examples/reproduce/results_template.md --out docs/results.md

Markers in the template:
  {{table:GROUP}}   the markdown table tools/compare_runs.py wrote to REPORT/GROUP.md
  {{setup}}         REPORT/setup.md (examples/reproduce/summarize.py: corpus, sizes, timings)
  {{claims}}        REPORT/claims.md (examples/reproduce/study.py claims: one computed line per claim)
  {{generated}}     a line naming the report folder and the UTC time of rendering
A missing table is rendered as an explicit "not run" note (and reported on stderr), so a partial
run still yields an honest page.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

MARKER = re.compile(r"\{\{(table:[A-Za-z0-9_]+|setup|claims|generated)\}\}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it (no machine-specific prefix)."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        return str(path)


def render(template: str, report: Path) -> str:
    """Replace every marker of ``template`` with the matching artefact of ``report``."""

    def sub(m: "re.Match[str]") -> str:
        key = m.group(1)
        if key == "generated":
            return f"_Generated from `{_shown(report)}` at {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC._"
        path = report / (f"{key}.md" if key in ("setup", "claims") else key.split(":", 1)[1] + ".md")
        if not path.is_file():
            print(f"render_results: {path} missing: marked as not run", file=sys.stderr)
            return f"_Not run: `{path.name}` was not produced by this run._"
        return path.read_text().rstrip()

    return MARKER.sub(sub, template)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, help="the run's report folder (OUT_DIR/report)")
    p.add_argument("--template", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    report, template = Path(a.report), Path(a.template)
    if not report.is_dir():
        raise FileNotFoundError(f"--report {report} is not a folder: run examples/reproduce/run.sh first")
    if not template.is_file():
        raise FileNotFoundError(f"--template {template} does not exist")
    text = template.read_text()
    if not MARKER.search(text):
        raise ValueError(f"{template} has no {{{{table:...}}}}/{{{{setup}}}} marker")
    Path(a.out).write_text(render(text, report))
    print(f"render_results: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"render_results.py: error: {err}")
