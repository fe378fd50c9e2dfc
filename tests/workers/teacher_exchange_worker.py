"""Worker for tests/test_teacher_exchange_group.py: one rank of a pretrain_let.py run whose
teacher exchange collectives (teacher/step_prefetch.py) are recorded with their process group.

Usage (under torchrun):  python teacher_exchange_worker.py OUT_DIR PRETRAIN_ARGS...
Writes OUT_DIR/rank{r}.json: one entry per collective the step teacher issued.
"""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CALLS = []


def _recording(name):
    real = getattr(dist, name)

    def call(*args, group=None, **kwargs):
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if caller.endswith("megatron_let/teacher/step_prefetch.py"):
            from megatron.core import parallel_state

            tp = parallel_state.get_tensor_model_parallel_group()
            CALLS.append({"fn": name, "is_megatron_tp_group": group is tp,
                          "is_default_group": group is None,
                          "ranks": dist.get_process_group_ranks(group) if group is not None else None,
                          "tp_ranks": dist.get_process_group_ranks(tp)})
        return real(*args, group=group, **kwargs)
    return call


def main() -> int:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    for name in ("all_gather_into_tensor", "all_to_all_single", "all_gather", "all_reduce"):
        setattr(dist, name, _recording(name))
    import pretrain_let

    rc = pretrain_let.main(argv)
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(CALLS, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
