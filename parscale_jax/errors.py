"""User-facing errors: one line that names the problem and the fix, no traceback.

* :class:`UserError`: bad input from the user (config, data, paths, flags); exit code 2.
* :class:`RunFailed`: the run could not go on for a reason outside the input (a full disk, a
  checkpoint that could not be written); one line too, exit code 1. Checkpoints written before
  it are intact.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, data, paths, flags). Printed as one line; exit code 2."""

    exit_code = 2


class RunFailed(UserError):
    """The run stopped for a reason outside its input (disk full, a failed save). One line; exit code 1."""

    exit_code = 1


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line ``main`` so a ``UserError`` prints ``error: ...`` and exits with its code."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split())  # always one line
            print(f"error: {msg}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 0 if rc is None else int(rc)

    return wrapped
