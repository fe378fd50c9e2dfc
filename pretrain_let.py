#!/usr/bin/env python
"""Pretrain a LLaMA student with megatron-core, optionally guided by a small frozen teacher.

    torchrun --nproc_per_node 8 pretrain_let.py --objective let --teacher-path ~/.cache/megatron_let/teachers/smollm2-135m-instruct ...

See README.md for the flags; ``--dry-run`` validates them and prints the layout without starting.
"""

import sys

from megatron_let.runtime.cli import quiet_backend_warnings

quiet_backend_warnings()


def main(argv=None) -> int:
    from megatron_let.runtime.lifeline import exit_with_agent
    from megatron_let.training.arguments import parse_args

    exit_with_agent()  # under torchrun: no orphan keeps training if the agent dies
    trainer = None
    try:
        cfg = parse_args(argv)
        if cfg.dry_run:
            from megatron_let.training.dry_run import dry_run

            dry_run(cfg)
            return 0
        from megatron_let.training.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.setup()
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"pretrain_let.py: error: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.close()  # releases the --save lock
        return 2
    from megatron_let.training.errors import RUN_ERRORS

    try:
        trainer.train()
    except RUN_ERRORS as e:  # NaN/inf, disk full, a corrupt checkpoint: one clear line, exit 1
        print(f"pretrain_let.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
        from megatron_let.runtime.device import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":  # guarded: async checkpoint workers re-import this file
    sys.exit(main())
