#!/usr/bin/env python
"""--async-save against synchronous saves, in the same run of this script.

Trains the same model twice with ``pretrain_let.py`` (checkpoint every ``--save-interval`` steps),
once with synchronous saves and once with ``--async-save``, and prints for each the wall time of the
whole run and the time the training loop spent blocked in saves (sync: each save's duration; async:
starting each save plus waiting for a finalisation), then the ratios async / sync.

    python benchmarks/bench_async_save.py [--hidden-size 384 --num-layers 6 --train-iters 12]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--train-iters", type=int, default=12)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    return p


def _run(args, save: str, asynchronous: bool) -> dict:
    heads = max(1, args.hidden_size // 64)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_let.py"),
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--ffn-hidden-size", str(4 * args.hidden_size), "--num-attention-heads", str(heads),
           "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
           "--vocab-size", str(args.vocab_size), "--mock-data", "--objective", "baseline",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4",
           "--train-iters", str(args.train_iters), "--save-interval", str(args.save_interval),
           "--save", save, "--log-interval", "1", "--device", args.device, "--seed", "1"]
    if asynchronous:
        cmd.append("--async-save")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    if asynchronous:
        blocked = sum(float(s) for s in re.findall(r"in the background \(([\d.]+)s to start it\)", out))
        blocked += sum(float(s) for s in re.findall(r"finalising blocked training ([\d.]+)s", out))
    else:
        blocked = sum(float(s) for s in re.findall(r"saved checkpoint \S+ in ([\d.]+)s", out))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(save) for f in fs)
    return {"wall": wall, "blocked": blocked, "saves": out.count("saved checkpoint"), "bytes": size}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.small:
        args.hidden_size, args.num_layers, args.vocab_size, args.seq_length = 64, 2, 256, 32
        args.train_iters, args.save_interval = 4, 2
    with tempfile.TemporaryDirectory() as d:
        sync = _run(args, os.path.join(d, "sync"), asynchronous=False)
        asyn = _run(args, os.path.join(d, "async"), asynchronous=True)
    per_ckpt = sync["bytes"] / max(1, sync["saves"]) / 2**20
    print(f"{sync['saves']} saves of ~{per_ckpt:.0f} MiB each, {args.train_iters} iterations")
    for name, r in (("sync", sync), ("async", asyn)):
        print(f"{name:5s}: run {r['wall']:.1f}s, training loop blocked in saves {r['blocked']:.2f}s")
    print(f"async / sync: run {asyn['wall'] / sync['wall']:.2f}x, "
          f"blocked in saves {asyn['blocked'] / max(sync['blocked'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
