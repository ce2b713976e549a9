"""One error type for every problem a user can fix, and the wrapper that turns it into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CharlmError(Exception):
    """A problem with the user's input, params or artifacts. The message names the problem and the fix."""


def run_main(main: Callable[[], None], prog: str) -> None:
    """Run a stage or command; a CharlmError becomes one line on stderr and exit status 2."""
    try:
        main()
    except CharlmError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
