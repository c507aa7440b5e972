"""The common root of the project's user-facing errors."""
from __future__ import annotations


class CqkdError(Exception):
    """Every user-facing failure derives from this class; its message names the
    file or key at fault and the fix.

    The CLIs (``python -m trainer``, ``dataset_tools/convert.py``,
    ``python -m benchmarks``) catch it, print ``error: <message>`` to stderr
    and exit 2 without a traceback (set ``CQKD_DEBUG=1`` to see it). Subclasses
    keep their historical bases too (``class StoreError(CqkdError,
    RuntimeError)``), so ``except RuntimeError`` code keeps working."""


def debug_enabled() -> bool:
    """``CQKD_DEBUG=1``: the CLIs re-raise instead of printing one line."""
    import os

    return os.environ.get("CQKD_DEBUG", "") not in ("", "0")


def exit_with_error(e: BaseException, status: int = 2) -> int:
    """The CLIs' report of a user-facing error: ``error: <message>`` on
    stderr, one line plus the hint, and the exit status to return;
    ``CQKD_DEBUG=1`` re-raises it instead (the traceback)."""
    import sys

    if debug_enabled():
        raise e
    print(f"error: {e}\n(set CQKD_DEBUG=1 for the traceback)", file=sys.stderr)
    return status
