"""Docs pages with a generated section (docs/reliability.md, docs/megatron-compat.md): the text
between a BEGIN and an END marker is written by a tool from the tests' own case lists, and a test
fails when it is stale. Only that section is ever replaced; the prose around it is hand-written."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class GeneratedSection:
    doc: str  # the page's path
    begin: str  # the marker lines, included in the section
    end: str

    def current(self, text: str) -> str:
        """The section as it stands in ``text`` (markers included)."""
        if self.begin not in text or self.end not in text:
            raise SystemExit(f"{self.doc} lacks the {self.begin!r} ... {self.end!r} markers")
        return text[text.index(self.begin):text.index(self.end) + len(self.end)]

    def main(self, render: Callable[[], str], description: str,
             argv: Optional[Sequence[str]] = None) -> int:
        """The tool's command line: rewrite the section, or with ``--check`` exit 1 when stale."""
        p = argparse.ArgumentParser(description=description)
        p.add_argument("--check", action="store_true", help="only report whether the doc is current")
        args = p.parse_args(argv)
        with open(self.doc) as f:
            text = f.read()
        current, fresh = self.current(text), render()
        name = self.doc.replace("\\", "/").split("/docs/")[-1]
        if args.check:
            print(f"docs/{name} is " + ("current" if current == fresh else "stale"))
            return 0 if current == fresh else 1
        with open(self.doc, "w") as f:
            f.write(text.replace(current, fresh))
        return 0
