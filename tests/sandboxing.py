"""Whether the real bubblewrap sandbox works on this machine, for tests that need it."""

from __future__ import annotations

import functools

import pytest

from exitagent.errors import SandboxUnavailable
from sandboxes.local import bwrap_path, probe


@functools.cache
def bwrap_failure() -> str | None:
    """Why bubblewrap cannot run here, or None when it can (probed once per test session)."""
    try:
        return probe(bwrap_path())
    except SandboxUnavailable as err:
        return str(err)


needs_bwrap = pytest.mark.skipif(bwrap_failure() is not None, reason="bubblewrap cannot run here")
