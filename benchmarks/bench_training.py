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
paper's ratio), sharing the student's vocabulary; ``--teacher-like smollm2-135m`` generates one with
SmolLM2-135M's architecture instead (random weights, nothing downloaded; needs --vocab-size 49152).
``--json FILE`` writes every figure for reports (scripts/gpu_check.sh).

``--tensor-model-parallel-size N`` (N > 1) runs every objective at TP=N under torchrun (N processes
on this machine, ``OMP_NUM_THREADS`` = cores / N each, also for the TP=1 reference) with
``--num-microbatches`` (default 2N) micro-batches per step, and measures the teacher's time per
rank and step (teacher time share × step time, the busiest rank) of the first teacher objective at
TP=1, at TP=N with the teacher's micro-batches shared out among the TP ranks (the default) and at
TP=N with ``--no-teacher-tp-split``: the split should take about 1/N of the TP=1 teacher time.

    python benchmarks/bench_training.py --tensor-model-parallel-size 2 --objectives let

``--compare-teacher-overlap`` runs the first teacher objective once more with
``--no-teacher-overlap`` and reports its step time and teacher share with the overlap (the
default on CUDA) and without (on CPU the flag is a no-op: both rows measure the same thing).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# SmolLM2-135M's config.json (the paper's teacher): the architecture, not the weights.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
TEACHERS_LIKE = {"smollm2-135m": SMOLLM2_135M}


def make_teacher_like(path, name, vocab):
    """A random-weight teacher with a published model's architecture, e.g. SmolLM2-135M."""
    # lazy: the parent launches pretrain_let.py runs; torch, transformers only to build a teacher/preset
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = TEACHERS_LIKE[name]
    if vocab != spec["vocab_size"]:
        raise SystemExit(f"--teacher-like {name} has vocabulary {spec['vocab_size']} but --vocab-size is "
                         f"{vocab}: the objectives need a shared vocabulary")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**spec)).save_pretrained(path, safe_serialization=True)
    return spec["hidden_size"], spec["num_hidden_layers"]


def make_teacher(path, vocab, student_params):
    # lazy: the parent launches pretrain_let.py runs; torch, transformers only to build a teacher/preset
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


def run(objective, args, teacher, metrics, extra, tp=1):
    launcher = [sys.executable] if tp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = launcher + [os.path.join(ROOT, "pretrain_let.py"), "--objective", objective,
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
    if args.transformer_impl:
        cmd += ["--transformer-impl", args.transformer_impl]
    if args.num_microbatches:
        cmd += ["--global-batch-size", str(args.num_microbatches * args.micro_batch_size)]
    if tp > 1:
        cmd += ["--tensor-model-parallel-size", str(tp)]
    cmd += extra
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # the same threads per process at every TP of one benchmark: teacher times compare work per rank
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.tensor_model_parallel_size)))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(metrics)]
    return [r for r in rows if r["split"] == "train"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_seconds(rows, lo, hi):
    """Median teacher time per step on the busiest rank (the step line's share × step time)."""
    return statistics.median(r["teacher time share"] * r["step time"] for r in rows
                             if lo < r["iteration"] <= hi)


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
    p.add_argument("--transformer-impl", choices=("transformer_engine", "local"),
                   help="passed to pretrain_let.py (default there: transformer_engine on CUDA)")
    p.add_argument("--teacher-like", choices=sorted(TEACHERS_LIKE),
                   help="generate a random teacher with this model's architecture")
    p.add_argument("--objectives", default="baseline,let,rkd,salt",
                   help="comma-separated objectives to measure (baseline is always measured)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="run the objectives at this TP under torchrun and compare the teacher's "
                        "time per rank with TP=1 (module doc)")
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per step (default: 1, or 2 x TP with TP > 1)")
    p.add_argument("--compare-teacher-overlap", action="store_true",
                   help="also run the first teacher objective with --no-teacher-overlap (module doc)")
    a = p.parse_args()
    tp = a.tensor_model_parallel_size
    if tp < 1:
        p.error(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if a.num_microbatches is None and tp > 1:
        a.num_microbatches = 2 * tp
    if a.num_microbatches is not None and a.num_microbatches < 1:
        p.error(f"--num-microbatches must be >= 1, got {a.num_microbatches}")
    objectives = ["baseline"] + [o for o in a.objectives.split(",") if o and o != "baseline"]
    unknown = sorted(set(objectives) - {"baseline", "let", "rkd", "salt"})
    if unknown:
        p.error(f"--objectives: unknown {unknown}; choose from baseline,let,rkd,salt")
    if a.teacher_like and a.teacher_path:
        p.error("--teacher-like and --teacher-path exclude each other")
    if a.iters <= a.warmup + 1 or a.iters // 2 <= a.warmup:
        p.error(f"--iters {a.iters} leaves no timed teacher-active step after --warmup {a.warmup} "
                f"(the teacher is active for the first iters // 2 steps)")
    stop = a.iters // 2  # LET/SALT teacher-active for the first half, baseline-cost afterwards

    with tempfile.TemporaryDirectory() as tmp:
        teacher = a.teacher_path
        teacher_desc = teacher
        if a.teacher_like:
            teacher = os.path.join(tmp, "teacher")
            h, layers = make_teacher_like(teacher, a.teacher_like, a.vocab_size)
            teacher_desc = f"random {a.teacher_like} architecture ({layers} layers x {h})"
            print(f"generated teacher: {teacher_desc}")
        elif teacher is None:
            # lazy: the parent launches pretrain_let.py runs; torch, transformers only to build a teacher/preset
            from megatron_let.model.llama import LlamaConfig, preset

            cfg = preset(a.preset, vocab_size=a.vocab_size) if a.preset else LlamaConfig(
                num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                vocab_size=a.vocab_size)
            teacher = os.path.join(tmp, "teacher")
            h, layers = make_teacher(teacher, a.vocab_size, cfg.num_parameters(include_embeddings=False))
            teacher_desc = f"random {layers} layers x {h}"
            print(f"generated teacher: {layers} layers x {h} hidden (student non-embedding params "
                  f"{cfg.num_parameters(False) / 1e6:.1f}M)")
        runs = {
            "baseline": [],
            "let": ["--let-stop-step", str(stop), "--let-kernel", "auto"],
            "rkd": [],
            "salt": ["--kd-stop-step", str(stop)],
        }
        runs = {name: runs[name] for name in objectives}
        results = {}
        for name, extra in runs.items():
            rows = run(name, a, teacher, os.path.join(tmp, f"{name}.jsonl"), extra, tp=tp)
            results[name] = rows
            print(f"  measured {name}{f' at TP={tp}' if tp > 1 else ''}: {len(rows)} iterations",
                  flush=True)
        teacher_runs = {}
        first = next((o for o in objectives if o != "baseline"), None)
        if tp > 1 and first is not None:
            # the first teacher objective's teacher time per rank: TP=1, TP=N split, TP=N replicated
            teacher_runs[f"TP={tp} split"] = results[first]
            for label, t, more in (("TP=1", 1, []), (f"TP={tp} replicated", tp, ["--no-teacher-tp-split"])):
                teacher_runs[label] = run(first, a, teacher, os.path.join(tmp, f"{first}-{t}-{len(more)}.jsonl"),
                                          runs[first] + more, tp=t)
                print(f"  measured {first} at {label}", flush=True)
        overlap_off = None
        if a.compare_teacher_overlap and first is not None:
            overlap_off = run(first, a, teacher, os.path.join(tmp, f"{first}-no-overlap.jsonl"),
                              runs[first] + ["--no-teacher-overlap"], tp=tp)
            print(f"  measured {first} with --no-teacher-overlap", flush=True)

    def median_time(rows, lo, hi):
        return statistics.median(r["step time"] for r in rows if lo < r["iteration"] <= hi)

    base = median_time(results["baseline"], a.warmup, a.iters)
    base_mem = max(r["peak memory MB"] for r in results["baseline"])
    print(f"\n{'objective':10s} {'step s (active)':>16s} {'throughput vs base':>19s} "
          f"{'peak mem vs base':>17s} {'step s (after stop)':>20s}")
    figures = {}
    for name, rows in results.items():
        active_hi = a.iters if name in ("baseline", "rkd") else stop
        t = median_time(rows, a.warmup, active_hi)
        after = median_time(rows, stop + 1, a.iters) if name in ("let", "salt") else float("nan")
        mem = max(r["peak memory MB"] for r in rows)
        print(f"{name:10s} {t:16.4f} {base / t:19.3f} {mem / base_mem:17.3f} {after:20.4f}")
        figures[name] = {"step_s_active": t, "throughput_vs_baseline": base / t,
                         "peak_memory_MB": mem, "peak_memory_vs_baseline": mem / base_mem,
                         "step_s_after_stop": None if after != after else after}
    memory_kind = "max_memory_allocated" if a.device == "cuda" else "process max RSS (includes the teacher and Python)"
    print(f"\nbaseline median step: {base:.4f}s; device {a.device}; peak memory is {memory_kind}"
          + (f"; TP={tp}, {a.num_microbatches} micro-batches per step" if tp > 1 else ""))
    teacher_figures = {}
    if teacher_runs:
        hi = a.iters if first == "rkd" else stop
        ref = teacher_seconds(teacher_runs["TP=1"], a.warmup, hi)
        print(f"\n{first} teacher time per rank and step (busiest rank), {a.num_microbatches} micro-batches:")
        for label in ("TP=1", f"TP={tp} split", f"TP={tp} replicated"):
            t = teacher_seconds(teacher_runs[label], a.warmup, hi)
            n = max(r.get("teacher micro-batches", float("nan")) for r in teacher_runs[label])
            print(f"  {label:16s} {t:8.4f} s  ({t / ref:.2f}x TP=1; {n:.0f} teacher micro-batches on the busiest rank)")
            teacher_figures[label] = {"teacher_s_per_step": t, "vs_tp1": t / ref,
                                      "teacher_microbatches_busiest_rank": n}
    overlap_figures = {}
    if overlap_off is not None:
        hi = a.iters if first == "rkd" else stop
        print(f"\n{first} with and without --teacher-overlap (teacher-active steps):")
        for label, rows in (("overlap on", results[first]), ("overlap off", overlap_off)):
            t = median_time(rows, a.warmup, hi)
            share = statistics.median(r["teacher time share"] for r in rows if a.warmup < r["iteration"] <= hi)
            print(f"  {label:12s} step {t:8.4f} s  teacher share {100 * share:5.1f}%")
            overlap_figures[label] = {"step_s": t, "teacher_share": share}
    if a.json:
        settings = {k: getattr(a, k) for k in ("preset", "vocab_size", "seq_length", "micro_batch_size",
                                               "iters", "warmup", "device", "bf16")}
        settings.update(teacher=teacher_desc, let_stop_step=stop, memory=memory_kind,
                        tensor_model_parallel_size=tp, num_microbatches=a.num_microbatches)
        with open(a.json, "w") as f:
            json.dump({"settings": settings, "objectives": figures,
                       "teacher_time_per_rank": teacher_figures,
                       "teacher_overlap": overlap_figures}, f, indent=1)


if __name__ == "__main__":
    main()
