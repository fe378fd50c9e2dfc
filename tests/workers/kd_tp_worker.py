"""Worker for tests/test_kd_loss_tp.py: one tensor-parallel rank of vocab_parallel_kd_loss.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test):
    python kd_tp_worker.py CASES_PT OUT_DIR
Each case holds full-vocab inputs; this rank keeps its vocabulary half of the student (and, for
``teacher_local`` cases, of the teacher), runs forward + backward over a TP group, and writes its
per-token loss and local gradient to OUT_DIR/rank{r}.pt. ``teacher_local == "sliced"``: the rank
keeps the teacher columns :func:`teacher_vocab_shard` names (a vocabulary-sliced teacher's output).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megatron_let.objectives.kd_loss import teacher_vocab_shard, vocab_parallel_kd_loss


def main() -> None:
    cases_path, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    world = dist.get_world_size()
    # A group object distinct from the default one, as Megatron's TP group would be.
    tp_group = dist.new_group(ranks=list(range(world)))
    rank = dist.get_rank(group=tp_group)

    results = []
    for case in torch.load(cases_path):
        student_full, teacher_full = case["student"], case["teacher"]
        v_local = student_full.shape[-1] // world
        sl = slice(rank * v_local, (rank + 1) * v_local)
        student = student_full[..., sl].clone().requires_grad_(True)
        teacher, start = teacher_full, None
        if case["teacher_local"] == "sliced":
            start, stop = teacher_vocab_shard(case["vocab_size"], student_full.shape[-1], tp_group)
            teacher = teacher_full[..., start:stop].clone()
        elif case["teacher_local"]:
            teacher = teacher_full[..., sl].clone()
        loss = vocab_parallel_kd_loss(
            student, teacher, case["mask"], temperature=case["rho"], vocab_size=case["vocab_size"],
            chunk_size=case["chunk_size"], tp_group=tp_group, teacher_vocab_start=start,
        )
        (loss * case["upstream"]).sum().backward()
        results.append({"loss": loss.detach(), "grad": student.grad})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
