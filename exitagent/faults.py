"""Crash-test hooks: ``EXITAGENT_FAULT=point:step`` SIGKILLs the process at that point.

Under torchrun ``point:step:rank`` kills only the process of that rank (``RANK``), the others
then have to notice.

The crash-safety tests of the trainer use these to die at exact places (after consuming a batch,
between saving state and publishing, in the middle of publishing) instead of racing a timer. With
the variable unset (always, outside those tests) a hook is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(point: str, step: int) -> None:
    wanted = os.environ.get("EXITAGENT_FAULT")
    if wanted and wanted in (f"{point}:{step}", f"{point}:{step}:{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
