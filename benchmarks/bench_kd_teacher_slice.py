"""Peak memory of the KD path per tensor-parallel rank: full-vocabulary teacher logits vs the
vocabulary-sliced teacher (each rank computes only its columns, ``HFTeacher.logits(vocab_range=)``).

    python benchmarks/bench_kd_teacher_slice.py --tp 2                  # vocab 49152, 2 x 512 tokens
    python benchmarks/bench_kd_teacher_slice.py --tp 2 --teacher-path ~/.cache/megatron_let/teachers/smollm2-135m-instruct

The KD path is what one rank runs for the KD term of a micro-batch: the teacher's logits, then
``vocab_parallel_kd_loss`` forward + backward on the rank's student logit shard (the student shard
and its gradient exist in both paths). Each rank is a process in a real TP group (gloo on CPU,
NCCL with ``--device cuda``); peak memory is measured as in ``bench_kd_loss.py`` (the profiler's
memory events on CPU, ``max_memory_allocated`` on CUDA) above what is allocated before the step.
Without ``--teacher-path`` the teacher is a 2-layer Llama of SmolLM2-135M's width and vocabulary.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kd_loss import _peak_bytes  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megatron_let.objectives.kd_loss import teacher_vocab_shard, vocab_parallel_kd_loss  # noqa: E402
from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig  # noqa: E402

MIB = 2**20


def _tiny_teacher(folder: str, vocab: int) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _worker(rank: int, a: argparse.Namespace, port: int, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.tp))
    device = torch.device(a.device if a.device != "cuda" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=a.tp,
                            init_method=f"tcp://127.0.0.1:{port}")
    group = dist.new_group(list(range(a.tp)))
    teacher = HFTeacher.load(TeacherConfig(path=a.teacher_path, dtype=a.dtype, bos=False), device)
    vocab = teacher.vocab_size
    multiple = 128 * a.tp  # Megatron's --make-vocab-size-divisible-by 128, times TP
    padded = -(-vocab // multiple) * multiple
    v_local = padded // a.tp
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device)
    student_full = torch.randn(a.batch, a.seq, padded, generator=g)
    student = student_full[..., rank * v_local:(rank + 1) * v_local].to(device, teacher.dtype)
    del student_full
    student.requires_grad_(True)
    start, stop = teacher_vocab_shard(vocab, padded, group)
    teacher.logits(tokens[:1, :8], vocab_range=(start, stop))  # the one-time head check, not timed

    out = {}

    def step(sliced: bool):
        def run() -> None:
            if sliced:
                t = teacher.logits(tokens, vocab_range=(start, stop))
                loss = vocab_parallel_kd_loss(student, t, vocab_size=vocab, chunk_size=a.chunk,
                                              tp_group=group, teacher_vocab_start=start)
            else:
                t = teacher.logits(tokens)
                loss = vocab_parallel_kd_loss(student, t, vocab_size=vocab, chunk_size=a.chunk,
                                              tp_group=group)
            out.setdefault(sliced, (t.numel() * t.element_size(), loss.detach().clone()))
            loss.sum().backward()
            student.grad = None
        return run

    rows = {}
    for sliced in (False, True):
        peak = _peak_bytes(step(sliced), device)
        rows["sliced" if sliced else "full"] = (out[sliced][0], peak)
    diff = float((out[True][1] - out[False][1]).abs().max())
    grad_bytes = student.numel() * student.element_size()
    results[rank] = (rows, diff, (start, stop), grad_bytes, vocab, padded)
    dist.barrier(group)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    p.add_argument("--teacher-path", help="HF teacher folder (default: a generated 2-layer Llama)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of the generated teacher")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=4096, help="--kd-chunk-size")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="auto", help="teacher dtype (auto: bf16 on CUDA, fp32 on CPU)")
    a = p.parse_args(argv)
    for name in ("tp", "vocab", "batch", "seq", "chunk"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.device == "cuda" and torch.cuda.device_count() < a.tp:
        raise SystemExit(f"--tp {a.tp} needs {a.tp} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        if a.teacher_path is None:
            a.teacher_path = tmp
            _tiny_teacher(tmp, a.vocab)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(a, port, results), nprocs=a.tp, join=True)
        results = dict(results)
    _, _, _, _, vocab, padded = results[0]
    print(f"TP={a.tp} vocab={vocab} (padded {padded}) tokens/rank={a.batch * a.seq} chunk={a.chunk} "
          f"device={a.device}")
    print("KD path peak = teacher logits + KD loss forward/backward, including the student's logit "
          "gradient shard; 'w/o grad' leaves that gradient out (NLL-only training has it too)")
    print(f"{'rank':>4} {'columns':>15} {'teacher logits MiB':>20} {'KD path peak MiB':>18} "
          f"{'ratio':>7} {'w/o grad MiB':>16} {'ratio':>7} {'max |loss diff|':>16}")
    for rank in sorted(results):
        rows, diff, (start, stop), grad, _, _ = results[rank]
        (tf, pf), (ts, ps) = rows["full"], rows["sliced"]
        print(f"{rank:>4} {f'[{start}, {stop})':>15} {f'{tf / MIB:.0f} -> {ts / MIB:.0f}':>20} "
              f"{f'{pf / MIB:.0f} -> {ps / MIB:.0f}':>18} {pf / ps:>6.2f}x "
              f"{f'{(pf - grad) / MIB:.0f} -> {(ps - grad) / MIB:.0f}':>16} "
              f"{(pf - grad) / (ps - grad):>6.2f}x {diff:>16.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
