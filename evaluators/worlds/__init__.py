"""Task worlds: where each domain's tasks come from and what its episodes act on.

``math_tasks``: the shipped math benchmarks and generated arithmetic. ``bfcl``: BFCL v3 multi-turn
entries and the API classes tool-use episodes call. ``mle``: the offline competitions, their
graders and the greedy program search. The evaluators one level up score answers in these worlds;
``exitagent/domains/`` glues each world to the collector.
"""
