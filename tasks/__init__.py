"""One module per pipeline stage: `run(params, *, paths)` holds the logic, `main()` serves DVC."""

from __future__ import annotations

import os
import sys


def _interrupted_quietly(kind, value, tb) -> None:
    """A Ctrl-C that reaches a stage before `stage_main` handles it (while the stage is still
    importing torch or pandas) is one line, as it is later; --debug ($RATCHET_DEBUG) keeps the
    traceback. Everything else goes to Python's own hook."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    main = spec.name if spec is not None else ""
    stage = main.removeprefix("tasks.") if main.startswith("tasks.") else None
    if issubclass(kind, KeyboardInterrupt) and not os.environ.get("RATCHET_DEBUG") and (
            stage or main == ""):  # a stage process (or `python -c`, as the test runs it)
        print(f"ratchet {stage or 'stage'}: interrupted", file=sys.stderr)
        return
    sys.__excepthook__(kind, value, tb)


sys.excepthook = _interrupted_quietly
