#!/usr/bin/env python
"""Fill the results-page template with the tables a reproduce run computed (no number typed in).

    python examples/reproduce/render_results.py --report runs/reproduce/full/report \\
        --template examples/reproduce/results_template.md --out docs/results.md

    python examples/reproduce/render_results.py --report runs/reproduce/crossover/report \\
        --report heldout=runs/reproduce/crossover_heldout/report \\
        --template examples/reproduce/crossover_template.md --out docs/results-crossover.md

Markers in the template:
  {{table:GROUP}}   the markdown table tools/compare_runs.py wrote to REPORT/GROUP.md
  {{table:NAME/GROUP}}  the same from the report given as ``--report NAME=DIR``
  {{setup}}         REPORT/setup.md (examples/reproduce/summarize.py: corpus, sizes, timings)
  {{setup:NAME}}    the same from report NAME
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
from typing import Dict, List, Optional

MARKER = re.compile(r"\{\{(table:(?:[A-Za-z0-9_]+/)?[A-Za-z0-9_]+|setup(?::[A-Za-z0-9_]+)?|claims|generated)\}\}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it (no machine-specific prefix)."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        return str(path)


def render(template: str, report: Path, named: Optional[Dict[str, Path]] = None) -> str:
    """Replace every marker of ``template`` with the matching artefact of ``report`` (or of the
    report ``named[NAME]`` for ``{{table:NAME/GROUP}}`` and ``{{setup:NAME}}``)."""
    named = named or {}

    def folder(name: Optional[str]) -> Path:
        if name is None:
            return report
        if name not in named:
            raise ValueError(f"the template names report {name!r}: pass --report {name}=DIR")
        return named[name]

    def sub(m: "re.Match[str]") -> str:
        key = m.group(1)
        if key == "generated":
            where = ", ".join(f"`{_shown(p)}`" for p in [report, *named.values()])
            return f"_Generated from {where} at {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC._"
        if key.startswith("table:"):
            group = key.split(":", 1)[1]
            name, _, group = group.rpartition("/")
            path = folder(name or None) / f"{group}.md"
        else:
            kind, _, name = key.partition(":")
            path = folder(name or None) / f"{kind}.md"
        if not path.is_file():
            print(f"render_results: {path} missing: marked as not run", file=sys.stderr)
            return f"_Not run: `{path.name}` was not produced by this run._"
        return path.read_text().rstrip()

    return MARKER.sub(sub, template)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, action="append",
                   help="the run's report folder (OUT_DIR/report); again as NAME=DIR for {{table:NAME/...}}")
    p.add_argument("--template", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    plain = [r for r in a.report if "=" not in r]
    if len(plain) != 1:
        raise ValueError(f"give exactly one --report DIR (others as NAME=DIR), got {a.report}")
    report, template = Path(plain[0]), Path(a.template)
    named = {k: Path(v) for k, _, v in (r.partition("=") for r in a.report if "=" in r)}
    for folder in [report, *named.values()]:
        if not folder.is_dir():
            raise FileNotFoundError(f"--report {folder} is not a folder: run examples/reproduce/run.sh first")
    if not template.is_file():
        raise FileNotFoundError(f"--template {template} does not exist")
    text = template.read_text()
    if not MARKER.search(text):
        raise ValueError(f"{template} has no {{{{table:...}}}}/{{{{setup}}}} marker")
    Path(a.out).write_text(render(text, report, named))
    print(f"render_results: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"render_results.py: error: {err}")
