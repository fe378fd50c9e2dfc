"""Hides wandb from the processes the suite starts (tests/conftest.py puts this folder first on
their PYTHONPATH): megatron-core imports wandb at import whenever it is installed, which costs each
of the suite's ~600 processes 0.45 s, while only the W&B tests use it. They get the real wandb back
with ``launch.with_wandb(env)``."""

raise ImportError("wandb is hidden from the suite's processes (tests/hidden_imports); "
                  "tests that log to W&B use launch.with_wandb(env)")
