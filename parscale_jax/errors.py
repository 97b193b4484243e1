"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, data, paths, flags). Printed as one line; exit code 2."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line ``main`` so a ``UserError`` prints ``error: ...`` and exits with 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split())  # always one line
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 0 if rc is None else int(rc)

    return wrapped
