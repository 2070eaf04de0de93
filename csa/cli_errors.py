"""How every ``csa`` command ends: one line on stderr and an exit status, never a traceback.

:func:`run_command` runs a command's body and turns the package's errors into ``<prog>: error: <message>``
with a status a script can test: 2 for bad input (:class:`~csa.validation.CSAInputError`, as argparse
does for bad flags), 1 for other failures, 130 for Ctrl-C.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from csa.validation import CSAError, CSAInputError

__all__ = ["run_command", "TRACEBACK_ENV"]

#: Environment variable that makes :func:`run_command` print the full traceback of unexpected errors.
TRACEBACK_ENV = "CSA_TRACEBACK"


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run the body of a command-line program and return its exit status.

    The package's own errors become one line ``<prog>: error: <message>`` on stderr: bad input
    (:class:`CSAInputError`) exits with 2, other :class:`CSAError` (a failed download, a diverged
    training run) and operating-system errors (disk full, permission denied) with 1, Ctrl-C with 130.
    Anything else is a bug: one line too, with the full traceback when ``CSA_TRACEBACK=1``.
    """
    def say(text: str) -> None:
        print(f"{prog}: {text}", file=sys.stderr, flush=True)

    try:
        return int(body() or 0)
    except CSAInputError as exc:
        say(f"error: {exc}")
        return 2
    except CSAError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C); finished outputs are kept, partial ones were not written")
        return 130
    except OSError as exc:
        say(f"error: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless asked for the traceback
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        say(f"error: unexpected {type(exc).__name__}: {exc} (please report it; set {TRACEBACK_ENV}=1 to see "
            f"the traceback)")
        return 1
