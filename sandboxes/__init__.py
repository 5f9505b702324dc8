"""Where model-written code runs: ``open_sandbox`` picks a backend behind the ``Sandbox`` seam.

``local`` (bubblewrap, the default), ``process`` (opt-in, no isolation), ``e2b`` (cloud) and
``fake`` (in memory, for tests). See ``sandboxes.base`` for the contract and threat model.
"""

from sandboxes.base import ExecResult, Limits, Sandbox, SandboxSpec
from sandboxes.factory import open_sandbox

__all__ = ["ExecResult", "Limits", "Sandbox", "SandboxSpec", "open_sandbox"]
