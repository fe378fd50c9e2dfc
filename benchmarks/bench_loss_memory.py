#!/usr/bin/env python
"""Peak memory of the loss path and of a training step, with and without activation recompute.

Part 1, the loss path of one micro-batch (vocab 49152 x seq 1280 x micro-batch 4 by default): from
the logits leaving the output layer through cross entropy, the objective's output loss and the
backward into the output layer. ``before`` is the pre-change trainer code (an fp32 ``clone`` of the
full-vocabulary logits for every objective); ``after`` is :meth:`Trainer._loss_func` itself. KD
(rkd) needs the original logits beside the in-place cross entropy and still clones.

Part 3 (``--part labels``), the model's loss path: NLL-only objectives pass the labels into the model
(megatron-core's cross entropy, as Megatron-LM) instead of taking the logits out (GPTModel's [b, s, V]
transpose, Float16Module's fp32 upcast, then our cross entropy).

Part 2, a whole training step of baseline and LET (a generated teacher ~10x smaller than the
student), with ``--recompute-granularity`` off, full (uniform, 1 layer) and selective.

Each measurement runs in a fresh process: the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set just before the measured section. On a GPU the
same figures are ``torch.cuda.max_memory_allocated`` deltas.

    python benchmarks/bench_loss_memory.py            # both parts, CPU, a few minutes
    python benchmarks/bench_loss_memory.py --part loss --dtype bf16
    python benchmarks/bench_loss_memory.py --small    # quick check of the harness
    python benchmarks/bench_loss_memory.py --part labels --dtype bf16   # labels into the model vs logits
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MIB = 2**20


# ------------------------------------------------------------------------------ measurement
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes above the level at ``start()``: CUDA allocator stats on GPU, VmHWM on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            self.base = _rss_kib("VmRSS") * 1024

    def peak(self):
        # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


# ------------------------------------------------------------------------------ part 1
def loss_path_worker(variant, objective, vocab, seq, micro_batch, dtype, device):
    # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
    import torch

    from megatron_let.model.llama import PerformanceConfig
    from megatron_let.objectives.base import ObjectiveContext, build_objective
    from megatron_let.runtime.device import ParallelConfig, initialize_distributed
    from megatron_let.training.metrics import MetricAccumulator
    from megatron_let.training.trainer import Trainer

    dev = torch.device(device)
    initialize_distributed(dev, ParallelConfig(), seed=1)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden = 256
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, dtype=dt, device=dev) * 0.02)
    x = torch.randn(seq, micro_batch, hidden, dtype=dt, device=dev, requires_grad=True)
    labels = torch.randint(0, vocab, (micro_batch, seq), device=dev)
    batch = {"labels": labels, "loss_mask": torch.ones(micro_batch, seq, device=dev)}
    teacher_logits = None
    if objective == "rkd":
        teacher_logits = torch.randn(micro_batch, seq, vocab, dtype=dt, device=dev)

    # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
    from megatron_let.objectives import registry

    obj = build_objective(objective, registry()[objective].Config(),
                          ObjectiveContext(train_iters=100, vocab_size=vocab))
    trainer = Trainer.__new__(Trainer)  # only what _loss_func reads
    trainer.objective, trainer.metrics, trainer.iteration = obj, MetricAccumulator(), 0
    trainer._forward_only = False
    trainer.cfg = SimpleNamespace(perf=PerformanceConfig())  # the loss function reads the CE fusion flag

    def before(logits):
        """The trainer's loss function before this change (kept here as the reference)."""
        # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        mask = batch["loss_mask"].float()
        nll = vocab_parallel_cross_entropy(logits.float().clone(), labels)
        loss_sum, _ = obj.output_loss(nll, logits, teacher_logits, mask, 0)
        return loss_sum

    def after(logits):
        return trainer._loss_func(batch, teacher_logits, logits)[0]

    loss_fn = before if variant == "before" else after
    meter = PeakMemory(dev)
    logits = torch.einsum("sbh,vh->bsv", x, weight)  # [b, s, V] as the output layer emits it
    meter.start()
    loss = loss_fn(logits)
    del logits  # as in megatron's schedule: only the graph keeps it
    loss.backward()
    return {"peak_bytes": meter.peak(), "loss": float(loss)}


# ------------------------------------------------------------------------------ part 3
def model_loss_worker(variant, objective, vocab, seq, micro_batch, hidden, dtype, device):
    """Forward + loss + backward of a 1-layer student (Float16Module in bf16) through the trainer's
    ``_forward_step``: ``after`` passes the labels into the model (megatron-core's cross entropy);
    ``before`` is the previous path - the model returns the logits (GPTModel transposes them to
    [b, s, V], Float16Module upcasts them to fp32) and the loss function takes their cross entropy."""
    # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
    import torch

    from megatron.core.transformer.module import Float16Module

    from megatron_let.model.llama import LlamaConfig, PerformanceConfig, build_student
    from megatron_let.objectives import registry
    from megatron_let.objectives.base import ObjectiveContext, build_objective
    from megatron_let.runtime.device import ParallelConfig, initialize_distributed
    from megatron_let.teacher.lifecycle import TeacherLifecycle
    from megatron_let.training.metrics import MetricAccumulator
    from megatron_let.training.trainer import Trainer

    dev = torch.device(device)
    initialize_distributed(dev, ParallelConfig(), seed=1)
    bf16 = dtype == "bf16"
    cfg = LlamaConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=2 * hidden, num_attention_heads=4,
                      vocab_size=vocab, seq_length=seq, make_vocab_size_divisible_by=1)
    torch.manual_seed(0)
    student = build_student(cfg, ParallelConfig(), bf16=bf16, use_cpu=dev.type == "cpu")
    model = Float16Module(student.config, student) if bf16 else student
    obj = build_objective(objective, registry()[objective].Config(),
                          ObjectiveContext(train_iters=100, vocab_size=vocab))
    trainer = Trainer.__new__(Trainer)  # what _forward_step and the loss function read
    trainer.device, trainer.objective, trainer.iteration, trainer._forward_only = dev, obj, 0, False
    trainer.model, trainer.student_chunks = [model], [student]
    trainer.metrics = MetricAccumulator()
    trainer.cfg = SimpleNamespace(perf=PerformanceConfig())  # the loss function reads the CE fusion flag
    trainer.teacher = TeacherLifecycle(TeacherLifecycle.Config(), obj, trainer.metrics, dev, print)  # no teacher
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, vocab, (micro_batch, seq), generator=g).to(dev),
             "labels": torch.randint(0, vocab, (micro_batch, seq), generator=g).to(dev),
             "loss_mask": torch.ones(micro_batch, seq, device=dev),
             "position_ids": torch.arange(seq, device=dev).expand(micro_batch, -1)}
    meter = PeakMemory(dev)
    meter.start()
    if variant == "before":
        logits = model(batch["tokens"], batch["position_ids"], None)
        loss = trainer._loss_func(batch, None, logits)[0]
        del logits
    else:
        output, loss_fn = trainer._forward_step(iter([batch]), model)
        loss = loss_fn(output)[0]
        del output
    loss.backward()
    return {"peak_bytes": meter.peak(), "loss": float(loss)}


# ------------------------------------------------------------------------------ part 2
def step_worker(objective, recompute, teacher, args):
    # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
    import torch

    from megatron_let.training.arguments import parse_args
    from megatron_let.training.trainer import Trainer

    argv = ["--objective", objective, "--mock-data", "--vocab-size", str(args["vocab"]),
            "--num-layers", str(args["layers"]), "--hidden-size", str(args["hidden"]),
            "--num-attention-heads", "8", "--seq-length", str(args["seq"]),
            "--micro-batch-size", str(args["micro_batch"]), "--train-iters", "2",
            "--device", args["device"], "--log-interval", "100", "--lr-warmup-fraction", "0"]
    if objective == "let":
        argv += ["--teacher-path", teacher, "--let-student-layer", str(args["layers"] // 2)]
    argv += {"off": [], "full": ["--recompute-granularity", "full", "--recompute-method",
                                 "uniform", "--recompute-num-layers", "1"],
             "selective": ["--recompute-granularity", "selective"]}[recompute]
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    trainer.cfg.batch.train_iters = 1
    trainer.train()  # warm-up step: optimizer state, allocator caches
    trainer.cfg.batch.train_iters = 2
    meter = PeakMemory(trainer.device)
    meter.start()
    trainer.train()
    peak = meter.peak()
    total = torch.cuda.max_memory_allocated() if trainer.device.type == "cuda" else \
        _rss_kib("VmHWM") * 1024
    trainer.close()
    return {"peak_bytes": peak, "total_bytes": total}


def make_teacher(path, vocab, hidden):
    # lazy: a worker subprocess loads only what it measures (RSS baseline); the parent stays torch-free
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=4, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


# ------------------------------------------------------------------------------ driver
def _in_subprocess(kind, payload, threads):
    # A fixed mmap threshold: glibc then returns every large tensor's pages on free (its dynamic
    # threshold would keep them in the heap, hiding later peaks from the resident set).
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(payload)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {payload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("loss", "step", "labels", "both"), default="both",
                   help="both = loss and step; labels = the model's loss path with/without labels")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--seq-length", type=int, default=1280)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes: checks the harness only")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, payload = a.worker[0], json.loads(a.worker[1])
        fn = {"loss": loss_path_worker, "step": step_worker, "labels": model_loss_worker}[kind]
        print(json.dumps(fn(**payload)))
        return
    threads = os.cpu_count() or 1
    if a.small:
        a.vocab_size, a.seq_length, a.micro_batch_size = 4096, 128, 2
    report = {"loss_path": [], "step": [], "labels": []}
    if a.part == "labels":
        v, s, b = a.vocab_size, a.seq_length, a.micro_batch_size
        print(f"model loss path, one micro-batch through a 1-layer student (hidden 64): vocab {v} x seq "
              f"{s} x micro-batch {b}, {a.dtype}; one fp32 [b, s, V] tensor is {v * s * b * 4 / MIB:.0f} "
              "MiB; peak above the model")
        print(f"  {'objective':<10} {'logits path MiB':>16} {'labels path MiB':>16} {'saved MiB':>10} "
              f"{'same loss':>10}")
        for objective in ("baseline", "let"):
            row = {"objective": objective, "dtype": a.dtype}
            for variant in ("before", "after"):
                r = _in_subprocess("labels", dict(variant=variant, objective=objective, vocab=v, seq=s,
                                                  micro_batch=b, hidden=64, dtype=a.dtype,
                                                  device=a.device), threads)
                row[variant] = r["peak_bytes"] / MIB
                row[variant + " loss"] = r["loss"]
            report["labels"].append(row)
            print(f"  {objective:<10} {row['before']:>16.0f} {row['after']:>16.0f} "
                  f"{row['before'] - row['after']:>10.0f} {str(row['before loss'] == row['after loss']):>10}",
                  flush=True)
    if a.part in ("loss", "both"):
        v, s, b = a.vocab_size, a.seq_length, a.micro_batch_size
        copy_mib = v * s * b * 4 / MIB
        print(f"loss path, one micro-batch: vocab {v} x seq {s} x micro-batch {b}, {a.dtype} logits "
              f"({copy_mib:.0f} MiB per fp32 full-vocabulary copy), peak above the logits")
        print(f"  {'objective':<10} {'before MiB':>11} {'after MiB':>10} {'saved MiB':>10}")
        for objective in ("baseline", "let", "rkd"):
            row = {"objective": objective}
            for variant in ("before", "after"):
                r = _in_subprocess("loss", dict(variant=variant, objective=objective, vocab=v,
                                                seq=s, micro_batch=b, dtype=a.dtype,
                                                device=a.device), threads)
                row[variant] = r["peak_bytes"] / MIB
            report["loss_path"].append(row)
            print(f"  {objective:<10} {row['before']:>11.0f} {row['after']:>10.0f} "
                  f"{row['before'] - row['after']:>10.0f}", flush=True)
    if a.part in ("step", "both"):
        args = dict(vocab=4096 if a.small else 8192, layers=8, hidden=256,
                    seq=128 if a.small else 1024, micro_batch=2 if a.small else 4, device=a.device)
        with tempfile.TemporaryDirectory() as tmp:
            teacher = os.path.join(tmp, "teacher")
            make_teacher(teacher, args["vocab"], 64)
            print(f"\ntraining step peak (student {args['layers']}x{args['hidden']}, seq "
                  f"{args['seq']}, micro-batch {args['micro_batch']}, vocab {args['vocab']}, fp32; "
                  "LET with a 4x64 teacher at layer 4)")
            print("  step peak = above the memory before the step (weights, gradient buffers, "
                  "optimizer state, teacher); total = the process's peak")
            print(f"  {'recompute':<10} {'baseline step':>14} {'LET step':>9} {'baseline total':>15} "
                  f"{'LET total':>10} {'LET/baseline total':>19}   (MiB)")
            for recompute in ("off", "full", "selective"):
                row = {"recompute": recompute}
                for objective in ("baseline", "let"):
                    r = _in_subprocess("step", dict(objective=objective, recompute=recompute,
                                                    teacher=teacher, args=args), threads)
                    row[objective] = r["peak_bytes"] / MIB
                    row[objective + " total"] = r["total_bytes"] / MIB
                report["step"].append(row)
                print(f"  {recompute:<10} {row['baseline']:>14.0f} {row['let']:>9.0f} "
                      f"{row['baseline total']:>15.0f} {row['let total']:>10.0f} "
                      f"{row['let total'] / row['baseline total']:>19.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
