"""The serving room: what ``python -m exitagent.serve`` runs (and what starts and feeds it).

``engine`` runs vLLM, ``gateway``/``gate``/``upstream`` are the public front, ``reload`` swaps in
the weights ``training.update`` publishes (``checkpoints``, ``served_form``, ``adapters``), and
``launch`` starts a serve process from Python. The entry point stays ``exitagent/serve.py``.
"""
