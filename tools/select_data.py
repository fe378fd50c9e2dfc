#!/usr/bin/env python
"""SALT_DS data selection (SALT paper eq. 11): score training sequences with a teacher, keep the top m.

    S(x) = median_i 1[x_i ∈ top-k of P_T(·|x_<i)] · (−log P_T(x_i | x_<i))

Takes the same data/model/batch flags as pretrain_let.py (so it sees exactly the run's training
samples: megatron-core's sample order depends on --train-iters, --global-batch-size, --seq-length,
--split and --seed), plus the selection flags below. Data-parallel under torchrun: rank r scores
candidates r, r+W, ...; rank 0 writes

    OUT.npy          selected training-sample indices (int64, best first) -> --kd-data-selection
    OUT.scores.npy   the score of every candidate (float32, -inf where nothing was scoreable)

    torchrun --nproc_per_node 8 tools/select_data.py <training data flags> --teacher-path T \\
        --select-output sel.npy [--select-count M] [--select-top-k 10]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_let.runtime.cli import quiet_backend_warnings  # noqa: E402

quiet_backend_warnings()  # before megatron-core is imported

import torch  # noqa: E402

from megatron_let.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_let.objectives.salt import DEFAULT_KD_FRACTION  # noqa: E402
from megatron_let.objectives.salt_select import score_candidates, write_selection  # noqa: E402
from megatron_let.runtime.device import (  # noqa: E402
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    resolve_device,
)
from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig  # noqa: E402
from megatron_let.teacher.inspection import check_vocab_compatible, inspect_teacher  # noqa: E402
from megatron_let.training.arguments import build_parser, parse_args  # noqa: E402
from megatron_let.data.run_datasets import build_run_datasets  # noqa: E402


def build_select_parser():
    p = build_parser()
    p.prog = "select_data.py"
    g = p.add_argument_group("SALT_DS selection")
    g.add_argument("--select-output", required=True, help="path of the selection .npy to write")
    g.add_argument("--select-top-k", type=int, default=10, help="k of eq. 11 (paper: 10)")
    g.add_argument("--select-count", type=int,
                   help="m, sequences to keep (default: what the KD phase consumes, "
                        "--kd-stop-step x --global-batch-size)")
    g.add_argument("--select-num-candidates", type=int,
                   help="score the first N training samples (default: all)")
    g.add_argument("--select-batch-size", type=int, default=8)
    return p


def main(argv=None) -> int:
    parser = build_select_parser()
    try:
        cfg = parse_args(argv, parser=parser)
        a = cfg.raw
        if not a.teacher_path:
            raise ValueError("select_data.py needs --teacher-path")
        if not a.global_batch_size:
            raise ValueError("select_data.py needs the run's --global-batch-size")
        if a.select_top_k < 1:
            raise ValueError("--select-top-k must be >= 1")
        out_dir = os.path.dirname(os.path.abspath(a.select_output))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--select-output folder {out_dir} does not exist")
        d = cfg.data
        tokenizer = build_tokenizer(d.tokenizer_type or "NullTokenizer", d.tokenizer_model,
                                    vocab_size=d.vocab_size)
        vocab = cfg.model.vocab_size or tokenizer.vocab_size
        info = inspect_teacher(a.teacher_path)
        check_vocab_compatible(info.vocab_size, vocab, vocab, info.tokenizer_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"select_data.py: error: {e}", file=sys.stderr)
        return 2

    device = resolve_device(cfg.device)
    initialize_distributed(device, ParallelConfig(), cfg.seed)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    train_ds, _ = build_run_datasets(cfg, tokenizer, a.global_batch_size)
    n = len(train_ds) if a.select_num_candidates is None else min(a.select_num_candidates, len(train_ds))
    kd_steps = a.kd_stop_step or max(1, round(DEFAULT_KD_FRACTION * a.train_iters))
    m = min(n, a.select_count or kd_steps * a.global_batch_size)

    teacher = HFTeacher.load(TeacherConfig(path=a.teacher_path, bos=cfg.teacher.bos), device)
    t0 = time.time()
    scores = score_candidates(teacher, train_ds, n, a.select_batch_size, a.select_top_k, vocab, device)
    if rank == 0:
        base = write_selection(a.select_output, scores, m)
        print(f"[select_data] scored {n} sequences in {time.time() - t0:.1f}s on {world} rank(s); "
              f"kept the top {m} -> {base}.npy (scores: {base}.scores.npy)", flush=True)
    teacher.release()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
