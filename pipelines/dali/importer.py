"""Importing DALI safely on CPython 3.11 before 3.11.8."""
from __future__ import annotations

import gc


def import_dali():
    """Import ``nvidia.dali`` with garbage collection paused.

    DALI's import parses hundreds of operator defaults with ``ast.literal_eval``;
    on CPython 3.11 before 3.11.8, a collection that runs finalizers in the
    middle of an AST construction raises "SystemError: AST constructor
    recursion depth mismatch" (CPython gh-106905). Seen here with numba
    dispatcher finalizers after FFCV had run in the same process.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401  (operators are generated on import)
        import nvidia.dali.math  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    finally:
        if was_enabled:
            gc.enable()
    return nvidia.dali
