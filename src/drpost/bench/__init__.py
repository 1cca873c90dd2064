"""Benchmarks and the demo, on the benchmark world (``drpost.world``); the top layer with the CLI.

- ``quality``: ``drpost bench quality --paradigm sft`` (settings x methods x seeds, knobs tuned on validation);
  ``rl``: the same for ``--paradigm rlhf|rlvr|dpo``; ``stats``: mean and standard error;
- ``system``: ``drpost bench system`` (per-component step cost, floors, crossovers), a package by job;
- ``meso``: ``drpost bench meso`` (MeSO vs AdamW); ``solver_cost``: wall time of each convex set's solve;
- ``demo``: ``drpost demo`` / ``make demo``.
"""
