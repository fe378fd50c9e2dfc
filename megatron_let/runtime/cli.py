"""Shared entry-point wrapper of the distributed tools: clear errors, exit code 2, clean shutdown."""

from __future__ import annotations

import sys
import warnings
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def quiet_backend_warnings() -> None:
    """Hide megatron-core's import-time warnings that apex / Transformer Engine are missing: the
    runtime reports the backend it uses itself. Entry points call this before importing megatron."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def run_tool(prog: str, body: Callable[[], object]) -> int:
    """Run ``body``; a user error prints ``prog: error: ...`` and returns 2 (argparse's convention);
    the process groups are always torn down."""
    try:
        body()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        # lazy: every CLI imports this module first, to quiet warnings before torch loads
        from megatron_let.runtime.device import destroy_distributed

        destroy_distributed()
    return 0
