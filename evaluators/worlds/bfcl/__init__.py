"""The BFCL task world: what tool-use episodes act on.

``env``: the BFCL v3 multi-turn entries and their eight API classes, from the installed
``bfcl-eval`` package, one private set of instances per rollout. ``calls``: the safe executor that
turns a model-written call into a method call on those instances (``ast``, never ``eval``).
"""
