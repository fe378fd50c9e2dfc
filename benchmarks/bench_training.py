#!/usr/bin/env python
"""Training-step cost of LET / RKD / SALT relative to the baseline, measured in the same run.

Runs ``pretrain_let.py`` once per objective with identical model, data and parallel settings and
reads the per-iteration ``step time`` and ``peak memory MB`` from ``--metrics-jsonl``. Reports the
median step time over the teacher-active iterations (after warm-up), the throughput ratio
(baseline step time / objective step time; the paper's table 4: LET 0.985, SALT 0.988) and the peak
memory ratio (LET 1.154x, SALT 1.174x at 1.4B), plus LET's step time after S_stop, which must
equal the baseline's.

    python benchmarks/bench_training.py                      # small CPU default (a few minutes)
    torchrun-free GPU example:
    python benchmarks/bench_training.py --device cuda --bf16 --preset llama-1b --seq-length 1280 \\
        --micro-batch-size 4 --teacher-path teachers/smollm2-135m --vocab-size 49152

Without --teacher-path a random Llama teacher ~10x smaller than the student is generated (the
paper's ratio), sharing the student's vocabulary.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_teacher(path, vocab, student_params):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # pick a width so that the teacher's non-embedding size is ~1/10 of the student's
    layers, hidden = 4, 64
    while 12 * layers * (hidden * 2) ** 2 < student_params / 10 and hidden < 2048:
        hidden *= 2
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return hidden, layers


def run(objective, args, teacher, metrics, extra):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_let.py"), "--objective", objective,
           "--mock-data", "--vocab-size", str(args.vocab_size), "--seq-length", str(args.seq_length),
           "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters),
           "--device", args.device, "--log-interval", str(args.iters), "--metrics-jsonl", metrics,
           "--lr-warmup-fraction", "0"]
    cmd += ["--model-preset", args.preset] if args.preset else [
        "--num-layers", "8", "--hidden-size", "256", "--ffn-hidden-size", "704",
        "--num-attention-heads", "8"]
    if args.bf16:
        cmd.append("--bf16")
    if objective != "baseline":
        cmd += ["--teacher-path", teacher]
    cmd += extra
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(metrics)]
    return [r for r in rows if r["split"] == "train"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="student preset (default: 8x256 CPU model)")
    p.add_argument("--teacher-path")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4, help="iterations ignored at the start")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    stop = a.iters // 2  # LET/SALT teacher-active for the first half, baseline-cost afterwards

    with tempfile.TemporaryDirectory() as tmp:
        teacher = a.teacher_path
        if teacher is None:
            from megatron_let.model.llama import LlamaConfig, preset

            cfg = preset(a.preset, vocab_size=a.vocab_size) if a.preset else LlamaConfig(
                num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                vocab_size=a.vocab_size)
            teacher = os.path.join(tmp, "teacher")
            h, layers = make_teacher(teacher, a.vocab_size, cfg.num_parameters(include_embeddings=False))
            print(f"generated teacher: {layers} layers x {h} hidden (student non-embedding params "
                  f"{cfg.num_parameters(False) / 1e6:.1f}M)")
        runs = {
            "baseline": [],
            "let": ["--let-stop-step", str(stop), "--let-kernel", "auto"],
            "rkd": [],
            "salt": ["--kd-stop-step", str(stop)],
        }
        results = {}
        for name, extra in runs.items():
            rows = run(name, a, teacher, os.path.join(tmp, f"{name}.jsonl"), extra)
            results[name] = rows
            print(f"  measured {name}: {len(rows)} iterations", flush=True)

    def median_time(rows, lo, hi):
        return statistics.median(r["step time"] for r in rows if lo < r["iteration"] <= hi)

    base = median_time(results["baseline"], a.warmup, a.iters)
    base_mem = max(r["peak memory MB"] for r in results["baseline"])
    print(f"\n{'objective':10s} {'step s (active)':>16s} {'throughput vs base':>19s} "
          f"{'peak mem vs base':>17s} {'step s (after stop)':>20s}")
    for name, rows in results.items():
        active_hi = a.iters if name in ("baseline", "rkd") else stop
        t = median_time(rows, a.warmup, active_hi)
        after = median_time(rows, stop + 1, a.iters) if name in ("let", "salt") else float("nan")
        mem = max(r["peak memory MB"] for r in rows)
        print(f"{name:10s} {t:16.4f} {base / t:19.3f} {mem / base_mem:17.3f} {after:20.4f}")
    print(f"\nbaseline median step: {base:.4f}s; device {a.device}; peak memory is "
          f"{'max_memory_allocated' if a.device == 'cuda' else 'process max RSS (includes the teacher and Python)'}")


if __name__ == "__main__":
    main()
