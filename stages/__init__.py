"""One script per pipeline stage, run by DVC as `python -m stages.NAME` from the repository root, so that
`import charlm` loads the library of the checkout being run (a queued experiment's own copy, not the
editable install).

Ctrl-C while a stage is still importing its libraries exits quietly with status 130, like Ctrl-C later on
(charlm.base.errors.run_main), instead of printing an import traceback. SystemExit unwinds normally, so temp files
are still cleaned up.
"""

import signal
import sys
from pathlib import Path


def _interrupted(signum, frame):
    print(f"{Path(sys.argv[0]).stem}: interrupted", file=sys.stderr)
    raise SystemExit(130)


signal.signal(signal.SIGINT, _interrupted)
