"""Each tools/*.py is a thin command line over package functions (which carry the tests): at most
MAX_LINES lines, except any listed in NOT_YET_THIN with the reason it is not split yet (none now)."""

import glob
import os

from launch import ROOT

MAX_LINES = 120
# tool -> why it is still longer; an entry is removed once the tool is split (the test insists).
NOT_YET_THIN: dict = {}


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def test_tools_are_thin_command_lines():
    sizes = {os.path.basename(p): _lines(p) for p in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))}
    assert len(sizes) >= 10, sizes  # the folder was found
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in NOT_YET_THIN}
    assert not too_long, f"tools over {MAX_LINES} lines: move their logic into megatron_let/ ({too_long})"
    stale = {name: sizes.get(name) for name in NOT_YET_THIN if sizes.get(name, 0) <= MAX_LINES}
    assert not stale, f"now thin (or gone): remove from NOT_YET_THIN {stale}"
