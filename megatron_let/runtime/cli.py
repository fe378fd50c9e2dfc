"""Shared entry-point wrapper of the distributed tools: clear errors, exit code 2, clean shutdown."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def run_tool(prog: str, body: Callable[[], object]) -> int:
    """Run ``body``; a user error prints ``prog: error: ...`` and returns 2 (argparse's convention);
    the process groups are always torn down."""
    try:
        body()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_let.runtime.device import destroy_distributed

        destroy_distributed()
    return 0
