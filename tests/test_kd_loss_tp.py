"""Two-process (gloo, CPU) check that vocab-parallel KD equals the single-process full-vocab result.

Each rank holds half of the padded vocabulary; the concatenation of the ranks' gradients and every
rank's per-token loss must match a dense full-vocabulary reference written here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

WORKER = Path(__file__).parent / "workers" / "kd_tp_worker.py"


def dense_kd_reference(student, teacher, mask, rho, vocab):
    """CE(P_T**rho / Z, softmax(student)) on the first ``vocab`` entries, autograd-differentiable."""
    p_t_rho = torch.exp(rho * F.log_softmax(teacher.float()[..., :vocab], dim=-1))
    p_t_rho = p_t_rho / p_t_rho.sum(dim=-1, keepdim=True)
    return -(p_t_rho * F.log_softmax(student[..., :vocab], dim=-1)).sum(dim=-1) * mask.float()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    # (vocab_size, teacher vocab, teacher given as local shard?, teacher dtype, rho, chunk)
    specs = [
        (37, 45, False, torch.float32, 0.25, 4),  # rank 1 partly padding, teacher full + own padding
        (37, 40, True, torch.float32, 1.0, 1000),  # teacher already sharded like the student
        (15, 40, False, torch.float32, 0.25, 3),  # rank 1 entirely padding
        (40, 40, False, torch.bfloat16, 0.25, 5),  # no padding, bf16 teacher
        # vocabulary-sliced teacher (HFTeacher.logits(vocab_range=teacher_vocab_shard(...)))
        (37, 45, "sliced", torch.float32, 0.25, 4),  # rank 1's slice is narrower than its shard
        (15, 40, "sliced", torch.float32, 0.5, 3),  # rank 1's slice is empty
    ]
    for vocab, v_t, local, t_dtype, rho, chunk in specs:
        lead = (2, 7)
        cases.append(
            {
                "student": 3 * torch.randn(*lead, 40, generator=g),
                "teacher": (3 * torch.randn(*lead, v_t, generator=g)).to(t_dtype),
                "mask": torch.rand(*lead, generator=g) > 0.25,
                "upstream": torch.rand(*lead, generator=g) + 0.5,
                "vocab_size": vocab,
                "teacher_local": local,
                "rho": rho,
                "chunk_size": chunk,
            }
        )
    return cases


def test_tp2_matches_full_vocab(tmp_path):
    cases = _make_cases()
    cases_path = tmp_path / "cases.pt"
    torch.save(cases, cases_path)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            # this checkout's package, not whichever one the virtualenv has installed
            PYTHONPATH=str(WORKER.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(cases_path), str(tmp_path)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "worker failed:\n" + "\n".join(
        f"--- rank {r} (exit {c}) ---\n{log}" for r, (c, log) in enumerate(zip(codes, logs))
    )

    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, case in enumerate(cases):
        student = case["student"].clone().requires_grad_(True)
        ref = dense_kd_reference(student, case["teacher"], case["mask"], case["rho"], case["vocab_size"])
        (ref * case["upstream"]).sum().backward()
        for r in range(2):
            torch.testing.assert_close(per_rank[r][i]["loss"], ref.detach(), atol=1e-5, rtol=1e-5)
        grad = torch.cat([per_rank[r][i]["grad"] for r in range(2)], dim=-1)
        torch.testing.assert_close(grad, student.grad, atol=1e-5, rtol=1e-5)
