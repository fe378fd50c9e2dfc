"""The training loop: a thin orchestrator over megatron-core (schedules, DDP, optimizer, checkpoints).

It knows nothing about any particular objective: it asks the active objective what it needs
(:class:`~megatron_let.objectives.base.Needs`), loads the teacher only on the ranks that need it,
captures student layer k where the objective wants it, and frees the teacher once no later step
needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from functools import partial
from typing import Dict, Iterator, List, Optional, Union

import torch

from megatron_let.objectives.base import Needs
from megatron_let.training.arguments import RunConfig
from megatron_let.training.estimates import flops_scalars, run_flops
from megatron_let.training.metrics import (
    IntervalAverage,
    IntervalTimer,
    MetricAccumulator,
    MetricsWriter,
    format_eta,
    peak_memory_mb,
)
from megatron_let.training.observability import named_range, observer_for_run


def load_selection(path: str, dataset_size: int):
    """A SALT_DS selection: a 1-D .npy of training-sample indices written by tools/select_data.py.
    Its format is checked by the preflight; its range needs the built dataset."""
    from megatron_let.training.preflight import read_selection

    sel = read_selection(path)
    if sel.max() >= dataset_size:
        raise ValueError(
            f"--kd-data-selection {path} indexes sample {int(sel.max())} but the training dataset "
            f"has {dataset_size} samples: was it made with the same --data-path/--split/"
            "--seq-length/--train-iters/--global-batch-size?"
        )
    return sel


def build_run_datasets(cfg: RunConfig, tokenizer, global_batch_size: int):
    """(train, valid) datasets of a run. Shared with tools (select_data) that must see exactly the
    training sample order: megatron-core's shuffle depends on the number of samples requested."""
    from megatron_let.data.datasets import DataConfig, build_datasets

    d = cfg.data
    data_config = DataConfig(
        data_path=d.data_path, split=d.split, seq_length=cfg.model.seq_length,
        mock_data=d.mock_data, seed=cfg.seed, data_cache_path=d.data_cache_path,
        tokenizer_type=d.tokenizer_type or "NullTokenizer", tokenizer_model=d.tokenizer_model,
        vocab_size=d.vocab_size, num_workers=cfg.runtime.num_workers,
        mmap_bin_files=cfg.runtime.mmap_bin_files, reset_position_ids=cfg.runtime.reset_position_ids,
        eod_mask_loss=cfg.runtime.eod_mask_loss,
    )
    from megatron_let.training.preflight import sample_counts

    train_samples, valid_samples = sample_counts(cfg, global_batch_size)
    # no test split: megatron-core would refuse an empty one even when it is never read
    train_ds, valid_ds, _ = build_datasets(data_config, tokenizer, train_samples, valid_samples, 0)
    return train_ds, valid_ds


TEACHER_NON_FINITE = "teacher output non-finite"  # micro-batches whose teacher output had NaN/inf


class _SignalFlag:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self, enabled: bool) -> None:
        self.received: Optional[int] = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    # printed on the console as their mean over the log interval
    CONSOLE_LOSSES = ("lm loss", "total loss", "align loss", "cosine similarity", "kd loss")

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_train_samples = 0
        self.consumed_selection_samples = 0
        self.teacher = None
        self.aligner = None
        self.capture = None
        self.metrics = MetricAccumulator()
        self.teacher_time = 0.0
        self._teacher_events = []  # (start, end) CUDA events of this step's teacher forwards
        self.step_teacher = None  # the teacher's work per step (teacher/step_prefetch.py)
        self.teacher_microbatches = 0  # teacher forwards on this rank in the last step
        self._forward_only = False
        self.save_lock = None
        self.async_saver = None  # --async-save (megatron_let.training.async_save)
        self.capture_chunk: Optional[int] = None  # the model chunk holding student layer k
        self._grad_norm_known = False  # set by each _train_step (tests may replace it)
        self._teacher_flags = []  # (kind, micro-batch, 0-dim "non-finite" tensor) of this step

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from megatron.core import parallel_state
        from megatron_let.runtime.device import initialize_distributed, resolve_device

        cfg = self.cfg
        # first: a stop signal that arrives during set-up is kept for the first step boundary
        # (SIGUSR1's default action would kill the worker)
        self.signals = _SignalFlag(cfg.checkpoint.exit_signal_handler)
        self._start_time = time.time()  # --exit-duration-in-mins counts from here
        self.device = resolve_device(cfg.device)
        self.use_cpu = self.device.type == "cpu"
        from megatron_let.training.preflight import preflight

        # everything --dry-run checks, before any compute: sets self.tokenizer and self.objective
        self.preflight = preflight(cfg, self)

        timeout = cfg.runtime.distributed_timeout_minutes  # --distributed-timeout-minutes
        initialize_distributed(self.device, cfg.parallel, cfg.seed,
                               **({"timeout_minutes": timeout} if timeout else {}))
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = cfg.batch.num_microbatches(self.dp_size)
        self.global_batch_size = cfg.batch.micro_batch_size * self.dp_size * self.num_microbatches
        self.is_first_stage = parallel_state.is_pipeline_first_stage()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        if cfg.checkpoint.save:  # before a stop signal can reach them: they must outlive it
            from megatron_let.runtime.signal_shield import start_checkpoint_helpers
            from megatron_let.training import fault_injection

            fault_injection.install_from_env()  # test hook: a chosen write fails (ENOSPC, EIO)
            start_checkpoint_helpers()
        self._take_save_lock()
        if cfg.checkpoint.save and cfg.checkpoint.async_save:
            from megatron_let.training.async_save import AsyncSaver

            self.async_saver = AsyncSaver()
        self.objective.context.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.teacher_exchange_group = self._teacher_exchange_group()
        if cfg.parallel.sequence_parallel:
            self.objective.context.sequence_parallel_group = self.objective.context.tp_group
        self.writer = MetricsWriter(
            cfg.logging.tensorboard_dir, cfg.logging.metrics_jsonl,
            enabled=self.rank == self.world - 1,  # the last rank sees the loss, as in Megatron-LM
            wandb=cfg.logging.wandb, run_config=vars(cfg.raw) if cfg.raw is not None else None,
        )
        if self.writer.tb is not None or self.writer.jsonl is not None:
            # tools/compare_runs.py counts the compute spent to reach a target from these
            self.writer.scalars(self.iteration, flops_scalars(run_flops(
                cfg, self.objective, getattr(self, "teacher_info", None), self.world,
                self.global_batch_size)), prefix="config/")
        self.observer = observer_for_run(cfg, self.objective, getattr(self, "teacher_info", None),
                                         self.rank, self.world, self.global_batch_size, self.device)

        self._build_model_and_optimizer()
        self._build_data()
        self._load_checkpoint()
        self._update_teacher(self.iteration)

    def build_tokenizer(self):
        from megatron_let.data.tokenizers import build_tokenizer

        d = self.cfg.data
        if d.mock_data and not d.tokenizer_type:
            return build_tokenizer("NullTokenizer", None, vocab_size=d.vocab_size)
        return build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_size=d.vocab_size)

    def validate_teacher(self) -> None:
        """Teacher path, layer range and vocabulary are checked before any weight is loaded."""
        cfg = self.cfg
        needs = self.objective.needs(0)
        # schedules only switch the teacher off (objectives/base.py), so step 0 decides
        self.needs_teacher_ever = needs.teacher
        if not self.needs_teacher_ever:
            if cfg.teacher.compile:
                raise ValueError(f"--teacher-compile: --objective {cfg.objective} runs no teacher")
            return
        if not cfg.teacher.path:
            raise ValueError(f"--objective {cfg.objective} needs --teacher-path")
        from megatron_let.teacher.inspection import check_vocab_compatible, inspect_teacher

        if cfg.teacher.compile:  # before any compute: the compiler torch.compile needs here
            from megatron_let.runtime.device import resolve_device
            from megatron_let.teacher.compile import check_compile_available

            check_compile_available(resolve_device(cfg.device))
        layer = needs.teacher_hidden_layer if needs.teacher_hidden_layer is not None else -1
        self.teacher_info = inspect_teacher(cfg.teacher.path, layer=layer,
                                            trust_remote_code=cfg.teacher.trust_remote_code,
                                            seq_length=cfg.model.seq_length,
                                            bos=cfg.teacher.bos)
        if cfg.teacher.tokenizer_mismatch:
            if needs.teacher_logits:
                raise ValueError("--let-tokenizer-mismatch aligns hidden states only; logit "
                                 f"distillation (--objective {cfg.objective}) needs a shared vocabulary")
            from megatron_let.data.tokenizers import build_tokenizer
            from megatron_let.teacher.token_alignment import TokenAligner

            self.aligner = TokenAligner(self.tokenizer,
                                        build_tokenizer("HuggingFaceTokenizer", cfg.teacher.path))
        else:
            check_vocab_compatible(
                self.teacher_info.vocab_size, cfg.model.vocab_size,
                cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
                self.teacher_info.tokenizer_size,
            )

    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        from megatron_let.model.llama import build_ddp_config, build_student_chunks
        from megatron_let.runtime.cpu_compat import apply_torch_adam_fallback_fixes
        from megatron_let.training.lr_schedule import build_scheduler

        cfg = self.cfg
        # One chunk per rank, or one per virtual stage under the interleaved pipeline (the
        # schedule then takes the list); DDP wraps each chunk, as in Megatron-LM.
        spec = self.preflight.spec
        for line in spec.describe():
            self._log(line)
        self.student_chunks = build_student_chunks(cfg.model, cfg.parallel, bf16=cfg.bf16,
                                                   use_cpu=self.use_cpu, perf=cfg.perf, spec=spec)
        # the whole stage without interleaving (the in-training downstream eval, which refuses
        # --num-layers-per-virtual-pipeline-stage, scores it)
        self.student = self.student_chunks[0]
        ddp_config = build_ddp_config(cfg.perf, cfg.parallel.use_distributed_optimizer)
        self.model = [
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_config,
                module=Float16Module(chunk.config, chunk) if cfg.bf16 else chunk,
                # later chunks' reductions overlap with the earlier chunks' backward anyway
                disable_bucketing=i > 0,
            )
            for i, chunk in enumerate(self.student_chunks)
        ]
        # The schedules read the first chunk's config (megatron-core's get_model_config).
        tconfig = self.student_chunks[0].config

        def per_chunk(name):
            funcs = [getattr(m, name) for m in self.model]
            return funcs[0] if len(funcs) == 1 else funcs

        tconfig.no_sync_func = per_chunk("no_sync")
        if cfg.perf.overlap_grad_reduce:
            # Megatron-LM's set-up (align_grad_reduce): each chunk starts its bucketed reduction
            # as soon as its last micro-batch's backward is done.
            tconfig.grad_sync_func = per_chunk("start_grad_sync")
        if cfg.perf.overlap_param_gather:
            tconfig.param_sync_func = per_chunk("start_param_sync")
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = None

        o = cfg.optim
        if cfg.parallel.use_distributed_optimizer:
            apply_torch_adam_fallback_fixes()  # no-op when apex/TE provide the optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.resolved_min_lr(), weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                clip_grad=o.clip_grad, bf16=cfg.bf16,
                params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                decoupled_lr=o.schedule.decoupled_lr, decoupled_min_lr=o.schedule.decoupled_min_lr,
            ),
            self.model,
        )
        self.scheduler = build_scheduler(self.optimizer, o, cfg.batch.train_iters,
                                         self.global_batch_size)

    def _build_data(self) -> None:
        from megatron_let.data.datasets import build_data_iterator

        cfg = self.cfg
        d = cfg.data
        self.train_ds, self.valid_ds = build_run_datasets(cfg, self.tokenizer, self.global_batch_size)
        self._make_iterator = partial(
            build_data_iterator, micro_batch_size=cfg.batch.micro_batch_size,
            data_parallel_rank=self.dp_rank, data_parallel_size=self.dp_size, seed=cfg.seed,
            pin_memory=self.device.type == "cuda",
            num_workers=cfg.runtime.num_workers,  # --num-workers
        )
        self.selection = None
        if d.kd_data_selection:  # objective and format: checked by the preflight
            self.selection = load_selection(d.kd_data_selection, len(self.train_ds))

    # ------------------------------------------------------------------ checkpoints
    def _take_save_lock(self) -> None:
        """Rank 0 locks --save (one writer per directory) and tidies interrupted saves, before any
        compute; the outcome is shared so that every rank stops when it fails."""
        from megatron_let.training.checkpointing import recover_interrupted_saves
        from megatron_let.training.errors import SaveLockError
        from megatron_let.training.save_lock import SaveLock

        save = self.cfg.checkpoint.save
        if not save:
            return
        error = None
        if self.rank == 0:
            try:
                self.save_lock = SaveLock(save, log=self._log)
                self.save_lock.acquire()
                self.save_lock.start_heartbeat()  # fresh through long evaluations and saves
                for action in recover_interrupted_saves(save):
                    self._log(action)
            except (SaveLockError, OSError) as e:
                if self.save_lock is not None:
                    self.save_lock.release()  # ours if taken: stop its heartbeat, remove it
                self.save_lock, error = None, e
        failed = torch.tensor([1 if error else 0], dtype=torch.int32, device=self._collective_device())
        torch.distributed.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise SaveLockError(f"rank 0 could not take the lock of --save {save} (see its error)")

    def _checkpoint_compatible(self, extra: Dict, path: str) -> None:
        """The checkpoint's architecture and tokenizer must be this run's; the objective may change."""
        from megatron_let.training.checkpointing import compatibility_problems
        from megatron_let.training.errors import CheckpointError

        ck = self.cfg.checkpoint
        problems = compatibility_problems(
            extra, self.cfg.model, self._tokenizer_record(),
            # a model-only start (--no-load-optim) may train at a new sequence length
            check_seq_length=not ck.no_load_optim, padded_vocab=self._padded_vocab())
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(problems))
        self._check_data_on_resume(extra, path)
        saved = extra.get("objective")
        if saved and saved != self.cfg.objective:
            self._log(f"objective changes from {saved} (checkpoint) to {self.cfg.objective}")

    def _check_data_on_resume(self, extra: Dict, path: str) -> None:
        """Another data stream than the checkpoint's is refused unless --override-data-on-resume."""
        from megatron_let.training.compatibility import data_problems, data_record
        from megatron_let.training.errors import CheckpointError

        saved = extra.get("data")
        if saved is None:
            self._log(f"{path} records no data settings (older megatron_let): --data-path, --split "
                      "and --seed are not checked against it")
            return
        problems = data_problems(saved, data_record(self.cfg))
        if not problems:
            return
        if self.cfg.checkpoint.no_load_optim or int(extra.get("iteration", 0)) == 0:
            # a new run from these weights (the reproduction's shared initial checkpoint): no
            # sample sequence is being continued
            self._log("data differs from the checkpoint's (a model-only start, allowed): "
                      + "; ".join(problems))
            return
        if not self.cfg.checkpoint.override_data_on_resume:
            raise CheckpointError(
                f"checkpoint {path} was trained on other data than this run: " + "; ".join(problems)
                + ". Resuming would read another sample sequence; pass --override-data-on-resume "
                "to resume on this run's data anyway")
        self._log("WARNING: --override-data-on-resume: resuming on other data than the checkpoint's: "
                  + "; ".join(problems))

    def _padded_vocab(self) -> int:
        return self.cfg.model.padded_vocab_size(self.cfg.parallel.tensor_model_parallel_size)

    def _tokenizer_record(self) -> Dict:
        return {"type": self.cfg.data.tokenizer_type or "NullTokenizer",
                "model": self.cfg.data.tokenizer_model, "vocab_size": self.cfg.model.vocab_size}

    def _load_checkpoint(self) -> None:
        from megatron_let.training.checkpointing import (checkpoint_dir, incomplete_saves,
                                                         load_checkpoint)

        ck = self.cfg.checkpoint
        if not ck.load:
            return
        extra = load_checkpoint(ck.load, self.student_chunks, self.optimizer, self.scheduler,
                                load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                                ckpt_step=ck.ckpt_step, verify=ck.verify,
                                check=self._checkpoint_compatible, log=self._log)
        if extra is None:
            partial_saves = incomplete_saves(ck.load)
            why = f" (incomplete, ignored: {', '.join(partial_saves)})" if partial_saves else ""
            self._log(f"no complete checkpoint under {ck.load}{why}; starting from scratch")
            return
        if ck.no_load_optim:
            # As Megatron-LM: without the optimizer state, the mixed-precision optimizers' fp32
            # main params (copied from the random init at construction) must follow the loaded model.
            self.optimizer.reload_model_params()
        self.iteration = int(extra["iteration"])
        self.consumed_train_samples = int(extra["consumed_train_samples"])
        self.consumed_selection_samples = int(extra.get("consumed_selection_samples", 0))
        self.objective.load_state_dict(extra.get("objective_state") or {}, self.iteration)
        self._log(f"resumed from {ck.load} at iteration {self.iteration}"
                  + ("" if extra["_path"] in (checkpoint_dir(ck.load, self.iteration),
                                              os.path.normpath(ck.load)) else f" ({extra['_path']})"))

    def save(self) -> None:
        from megatron_let.training.checkpointing import save_checkpoint

        t0 = time.time()
        if self.async_saver is not None:
            self._save_async(save_checkpoint)
            return
        with self._params_synced():
            path = save_checkpoint(
                self.cfg.checkpoint.save, self.iteration, self.student_chunks, self.optimizer,
                self.scheduler, self._checkpoint_extra(),
            )
        self._saved(path, t0)

    def _saved(self, path: str, t0: float, how: str = "") -> None:
        self._log(f"saved checkpoint {path} in {time.time() - t0:.1f}s{how}")
        if self.save_lock is not None:  # after the log line: a failure here loses no checkpoint
            self.save_lock.heartbeat(force=True)

    def _save_async(self, save_checkpoint) -> None:
        """--async-save: start this iteration's save; training goes on while it is written."""
        t0 = time.time()
        with self._params_synced():
            path = save_checkpoint(
                self.cfg.checkpoint.save, self.iteration, self.student_chunks, self.optimizer,
                self.scheduler, self._checkpoint_extra(), async_saver=self.async_saver,
                on_saved=lambda p, took: self._saved(
                    p, t0, f" (asynchronous save; finalising blocked training {took:.1f}s)"))
        self._log(f"writing checkpoint {path} in the background "
                  f"({time.time() - t0:.1f}s to start it)")

    def _checkpoint_extra(self) -> Dict:
        from megatron_let.training.compatibility import data_record

        return {"iteration": self.iteration, "consumed_train_samples": self.consumed_train_samples,
                "consumed_selection_samples": self.consumed_selection_samples,
                "objective": self.cfg.objective, "model": dataclasses.asdict(self.cfg.model),
                "tokenizer": self._tokenizer_record(), "padded_vocab_size": self._padded_vocab(),
                "data": data_record(self.cfg), "objective_state": self.objective.state_dict()}

    def _finished(self, last: Dict[str, float]) -> Dict[str, float]:
        self.finish_saves()
        return last

    def finish_saves(self) -> None:
        """Collective: finalise an asynchronous save still being written (before any exit)."""
        if self.async_saver is not None:
            self.async_saver.wait()

    @contextlib.contextmanager
    def _params_synced(self):
        """With --overlap-param-gather the parameter all-gather is dispatched by forward pre-hooks;
        evaluation and checkpointing need every parameter gathered first (as Megatron-LM does,
        disable the hooks with a synchronous gather, re-enable them after)."""
        overlapped = self.cfg.perf.overlap_param_gather and getattr(self, "model", None)
        if overlapped:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlapped:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    # ------------------------------------------------------------------ teacher
    def _teacher_needed_here(self, needs: Needs) -> bool:
        from megatron.core import parallel_state

        if needs.teacher_hidden_layer is not None and needs.student_layer is not None:
            from megatron_let.training.layer_capture import find_layer_in_chunks

            if find_layer_in_chunks(self.student_chunks, needs.student_layer) is not None:
                return True
        return needs.teacher_logits and parallel_state.is_pipeline_last_stage()

    def _update_teacher(self, step: int) -> None:
        """Load the teacher where this step needs it; release it once no later step does."""
        needs = self.objective.needs(step)
        here = self._teacher_needed_here(needs)
        if here and self.teacher is None:
            from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

            layer = needs.teacher_hidden_layer if needs.teacher_hidden_layer is not None else -1
            self.teacher = HFTeacher.load(
                TeacherConfig(path=self.cfg.teacher.path, layer=layer,
                              trust_remote_code=self.cfg.teacher.trust_remote_code,
                              bos=self.cfg.teacher.bos, compile=self.cfg.teacher.compile),
                self.device,
            )
            self._log(f"teacher loaded on rank {self.rank}: {self.cfg.teacher.path}"
                      + (" (blocks under torch.compile)" if self.cfg.teacher.compile else ""),
                      all_ranks=True)
            self.step_teacher = self._build_step_teacher()
        if needs.student_layer is not None and self.capture is None and here:
            self._install_capture(needs.student_layer)
        if not needs.teacher and self.teacher is not None:
            # Schedules only decay: once a step needs no teacher, no later step does.
            self.teacher.release()
            self.teacher = None
            self.step_teacher = None
            if self.capture is not None:
                self.capture.remove()
                self.capture = None
                self.capture_chunk = None
            self._log(f"teacher released at iteration {step}", all_ranks=False)

    def _teacher_exchange_group(self):
        """The teacher's TP exchange's own group (teacher/step_prefetch.py), made on every rank
        (new_group is collective) when the run may split the teacher among TP ranks."""
        from megatron.core import parallel_state
        from megatron_let.teacher.step_prefetch import new_exchange_group

        split = self.cfg.teacher.tp_split
        if (not getattr(self, "needs_teacher_ever", False) or split is False
                or parallel_state.get_tensor_model_parallel_world_size() == 1):
            return None
        return new_exchange_group(parallel_state.get_tensor_model_parallel_group())

    def _build_step_teacher(self):
        from megatron.core import parallel_state
        from megatron_let.teacher.step_prefetch import StepTeacher

        t = self.cfg.teacher
        tp = parallel_state.get_tensor_model_parallel_world_size()
        split = t.tp_split if t.tp_split is not None else tp > 1
        overlap = t.overlap if t.overlap is not None else self.device.type == "cuda"
        return StepTeacher(self.teacher, self.aligner,
                           tp_group=self.teacher_exchange_group,
                           split=split and tp > 1, sequence_parallel=self.cfg.parallel.sequence_parallel,
                           overlap=overlap, timer=self._teacher_timer)

    def _begin_teacher_step(self, data_iterator):
        """Prefetch the step's micro-batches and run (or enqueue) this rank's share of the
        teacher's work on them; the schedule then reads the prefetched batches."""
        from megatron_let.teacher.step_prefetch import StepWork, prefetch_step

        st = self.step_teacher
        if st is None:
            return data_iterator
        needs = self.objective.needs(self.iteration)
        work = StepWork(
            hidden=self.capture is not None and needs.teacher_hidden_layer is not None,
            logits=needs.teacher_logits and any(c.post_process for c in self.student_chunks),
            vocab_range=self.objective.teacher_logits_range())
        if not st.eager or not (work.hidden or work.logits):
            st.begin_step(None, work)
            return data_iterator
        batches, data_iterator = prefetch_step(data_iterator, self.num_microbatches)
        st.begin_step(batches, work)
        return data_iterator

    def _install_capture(self, student_layer: int) -> None:
        from megatron_let.training.layer_capture import LayerCapture, find_layer_in_chunks

        self.capture_chunk, layer = find_layer_in_chunks(self.student_chunks, student_layer)
        sp = self.cfg.parallel.sequence_parallel

        def alignment(h, t, m):
            with named_range("alignment"):
                return self.objective.hidden_loss(h, t, m, self.iteration)

        self.capture = LayerCapture(
            layer, alignment, sequence_parallel=sp,
            weight_fn=lambda: self.objective.hidden_grad_weight(self.iteration),
        )
        replicated = not sp

        def sink(weighted_sum, count, metrics):
            if weighted_sum is not None:  # None: gradient norms measured in backward
                self.metrics.add("hidden loss term", weighted_sum, count, replicated)
            self.metrics.add_many(metrics, replicated)

        self.capture.metrics_sink = sink

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        from megatron_let.teacher.step_prefetch import StepBatches

        batch = next(data_iterator)
        # the micro-batch's index in the step when its teacher work was prefetched
        j = data_iterator.index if isinstance(data_iterator, StepBatches) else None
        # asynchronous from the loader's pinned memory (CUDA): no host sync per micro-batch
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        needs = self.objective.needs(self.iteration)
        # under the interleaved pipeline the schedule calls this once per chunk and micro-batch
        chunk = next(i for i, m in enumerate(self.model) if m is model)
        holds_k = self.capture is not None and chunk == self.capture_chunk
        post_process = self.student_chunks[chunk].post_process
        teacher_logits = None
        if not self._forward_only and self.teacher is not None:
            # LET† (aligner: the teacher has its own tokenizer) is handled by the step teacher
            if holds_k and needs.teacher_hidden_layer is not None:
                hidden, sharded = self.step_teacher.hidden(j, tokens)
                self._note_teacher_output("hidden states", j, hidden)
                self.capture.set_pending(hidden, loss_mask, teacher_sharded=sharded)
            if needs.teacher_logits and post_process:
                teacher_logits = self.step_teacher.logits(
                    j, tokens, self.objective.teacher_logits_range())
                self._note_teacher_output("logits", j, teacher_logits)
        # NLL-only objectives and evaluation pass the labels: megatron-core computes the (vocab-
        # parallel) cross entropy inside the model, as Megatron-LM does, so the model returns the
        # per-token loss and no [b, s, V] copy of the logits (transposed, upcast to fp32) is made.
        labels = batch["labels"].to(self.device, non_blocking=True) if post_process and not self._reads_logits() else None
        output = model(tokens, position_ids, None, labels=labels)
        if holds_k:
            self.capture.clear()
        return output, partial(self._loss_func, batch, teacher_logits, nll_in_output=labels is not None)

    def _reads_logits(self) -> bool:
        """This step's output loss reads the logits themselves (KD), not only their NLL."""
        return not self._forward_only and self.objective.needs(self.iteration).logits

    @contextlib.contextmanager
    def _teacher_timer(self):
        """Teacher time: wall clock on CPU; CUDA events on GPU, where the host's clock would time
        the queue of student work rather than the teacher (read once per step)."""
        if self.device.type != "cuda":
            t0 = time.time()
            with named_range("teacher forward"):
                yield
            self.teacher_time += time.time() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with named_range("teacher forward"):
            yield
        end.record()
        self._teacher_events.append((start, end))

    def _step_teacher_time(self) -> float:
        if self._teacher_events:
            for _, end in self._teacher_events:  # on the main and (overlap) the side stream
                end.synchronize()
            self.teacher_time += sum(s.elapsed_time(e) for s, e in self._teacher_events) / 1000.0
            self._teacher_events = []
        return self.teacher_time

    def _loss_func(self, batch: Dict[str, torch.Tensor], teacher_logits, output: torch.Tensor,
                   nll_in_output: bool = False):
        """``output``: the logits ``[b, s, V/TP]``, or with ``nll_in_output`` the per-token NLL
        ``[b, s]`` that the model computed from the labels (:meth:`_forward_step`)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        labels = batch["labels"].to(output.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(output.device, non_blocking=True).float()
        needs_logits = self._reads_logits()
        if nll_in_output:
            nll, logits = output, None
        else:
            # vocab_parallel_cross_entropy overwrites its input (its own fp32 copy when logits are
            # bf16): an objective that reads the logits themselves (KD) gets them cloned first.
            logits = output
            cross_entropy = vocab_parallel_cross_entropy
            if self.cfg.perf.cross_entropy_loss_fusion:  # as the model's own loss path (build_transformer_config)
                from megatron_let.training.megatron_compat import fused_cross_entropy

                cross_entropy = fused_cross_entropy(self.cfg.perf.cross_entropy_fusion_impl)
            nll = cross_entropy(logits.clone() if needs_logits else logits, labels)
        count = loss_mask.sum()
        nll_sum = (nll * loss_mask).sum()
        if self._forward_only:
            self.metrics.add("lm loss", nll_sum.detach(), count, replicated=True)
            return nll_sum, count.int(), {}
        with named_range("kd loss" if teacher_logits is not None else "output loss"):
            loss_sum, metrics = self.objective.output_loss(nll, logits if needs_logits else None,
                                                           teacher_logits, loss_mask, self.iteration)
        self.metrics.add("lm loss", nll_sum.detach(), count, replicated=True)
        self.metrics.add("output loss term", loss_sum.detach(), count, replicated=True)
        self.metrics.add_many(metrics, replicated=True)
        return loss_sum, count.int(), {}

    def _train_step(self, data_iterator) -> Dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._forward_only = False
        self._teacher_flags = []
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward = get_forward_backward_func()
        if self.capture is not None:
            self.capture.start_step()
        data_iterator = self._begin_teacher_step(data_iterator)
        with self.observer.timers("forward-backward"):
            forward_backward(
                forward_step_func=self._forward_step, data_iterator=data_iterator, model=self.model,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.batch.micro_batch_size, forward_only=False,
            )
        if getattr(self, "step_hooks", None) is not None:
            self.step_hooks.after_forward_backward()  # --empty-unused-memory-level
        if self.capture is not None and self.objective.needs(self.iteration).teacher_hidden_layer \
                is not None:
            # layer k's stage: the alignment loss entered the backward once per micro-batch
            self.capture.check_step(self.num_microbatches)
        if self.step_teacher is not None:
            self.teacher_microbatches = self.step_teacher.forwards
            self.step_teacher.end_step()
        with self.observer.timers("optimizer"):
            update_ok, grad_norm, _ = self.optimizer.step()
        self._grad_norm_known = grad_norm is not None  # None with --clip-grad 0: nothing to check
        if update_ok:
            self.scheduler.step(increment=1)
        return {"grad norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if update_ok else 1.0}

    def evaluate(self) -> Dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._forward_only = True
        for chunk in self.model:
            chunk.eval()
        # the same held-out batches at every evaluation, so validation curves are comparable
        iterator = self._per_chunk(lambda: self._make_iterator(self.valid_ds, consumed_samples=0))
        forward_backward = get_forward_backward_func()
        with torch.no_grad(), self._params_synced():
            for _ in range(self.cfg.logging.eval_iters):
                forward_backward(
                    forward_step_func=self._forward_step, data_iterator=iterator, model=self.model,
                    num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                    micro_batch_size=self.cfg.batch.micro_batch_size, forward_only=True,
                )
        for chunk in self.model:
            chunk.train()
        self._forward_only = False
        out = self.metrics.reduce(["lm loss"])
        loss = out.get("lm loss", float("nan"))
        return {"lm loss": loss, "ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        iterator, on_selection = None, None
        for chunk in self.model:
            chunk.train()
        tokens_per_step = self.global_batch_size * cfg.model.seq_length
        interval = IntervalTimer(self.iteration)
        averages = IntervalAverage(self.CONSOLE_LOSSES)
        last: Dict[str, float] = {}
        metric_names = ["lm loss", "output loss term", "hidden loss term",
                        *self.objective.metric_names]
        if cfg.check_for_nan_in_loss_and_grad and getattr(self, "needs_teacher_ever", False):
            metric_names.append(TEACHER_NON_FINITE)  # rides on the step's one reduction
        self._log(
            f"training {cfg.objective} for {cfg.batch.train_iters} iterations from iteration "
            f"{self.iteration}: global batch {self.global_batch_size} = micro {cfg.batch.micro_batch_size}"
            f" x dp {self.dp_size} x {self.num_microbatches} micro-batches, seq {cfg.model.seq_length}"
        )
        from megatron_let.training.megatron_compat import StepHooks

        self.step_hooks = StepHooks(cfg.runtime, self.device, self._start_time)
        self.step_hooks.start()  # --manual-gc
        # tests slow steps down to land a SIGKILL between checkpoints
        test_sleep = float(os.environ.get("MEGATRON_LET_TEST_STEP_SLEEP", "0"))
        while self.iteration < cfg.batch.train_iters:
            if test_sleep:
                time.sleep(test_sleep)
            self._update_teacher(self.iteration)
            use_selection = self.selection is not None and self.objective.needs(
                self.iteration).kd_data_selection
            if use_selection is not on_selection:  # SALT_DS: KD steps read the selection
                iterator = self._iterator(use_selection)
                on_selection = use_selection
            t0 = time.time()
            self.teacher_time = 0.0
            schedule = self.objective.schedule_values(self.iteration)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            self.observer.profiler.begin(self.iteration)
            with self.observer.profiler.step_range(self.iteration):
                step_stats = self._train_step(iterator)
            step_time = time.time() - t0
            self.observer.profiler.end(self.iteration)
            self.observer.accumulate(self.metrics, self.model, self.optimizer)
            self.iteration += 1
            self.step_hooks.after_step(self.iteration)  # --manual-gc-interval, empty cache
            if use_selection:
                self.consumed_selection_samples += self.global_batch_size
            else:
                self.consumed_train_samples += self.global_batch_size
            checks = {"grad norm": step_stats["grad norm"]} if self._grad_norm_known else {}
            reduced = self.metrics.reduce(
                metric_names + self.observer.metric_names,
                finite_checks=checks if cfg.check_for_nan_in_loss_and_grad else None)
            if reduced.pop(TEACHER_NON_FINITE, 0.0) > 0:  # before the student's NaN it causes
                self._stop_teacher_non_finite()
            if self.metrics.non_finite:  # before anything of this step is logged or saved
                self._stop_non_finite(reduced, step_stats)
            if self.save_lock is not None:
                self.save_lock.heartbeat()
            if self.async_saver is not None:  # finalise a save whose writers are all done
                self.async_saver.poll()
            values = dict(reduced)
            values.update(self.observer.values(values, self.iteration - 1, step_time))
            # both terms are token means over the same global batch, so they add
            values["total loss"] = values.pop("output loss term", float("nan")) + values.pop(
                "hidden loss term", 0.0)
            values.update(schedule)
            values = self.objective.end_step(self.iteration, values)  # e.g. LET's grad-ratio λ
            values.update(step_stats)
            values["lr"] = lr
            values["step time"] = step_time
            values["tokens per sec"] = tokens_per_step / max(step_time, 1e-9)
            values["peak memory MB"] = peak_memory_mb()
            values["teacher time share"] = self._teacher_share(step_time)  # after reduce: synced
            if getattr(self, "needs_teacher_ever", False):
                values.update(self._teacher_counts())
            self.writer.scalars(self.iteration, values)
            last = values
            averages.add(values, skipped=bool(step_stats["skipped"]))
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == cfg.batch.train_iters:
                # losses: the interval's mean, as Megatron-LM prints them; the rest: this iteration
                self._console_line({**values, **averages.pop()}, interval.per_iteration(self.iteration))
                interval.restart(self.iteration)
            with interval.paused():
                if cfg.logging.eval_interval and self.iteration % cfg.logging.eval_interval == 0:
                    self.step_hooks.around_eval()
                    self._run_eval()
                    self.step_hooks.around_eval()
                every = cfg.logging.eval_downstream_interval
                if every and self.iteration % every == 0:
                    self._run_downstream_eval()
            stop_signal = self.signals.any_rank(self._collective_device())
            out_of_time = self.step_hooks.duration_expired(time.time())  # --exit-duration-in-mins
            save_now = cfg.checkpoint.save and (
                (cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0)
                or stop_signal or out_of_time
            )
            if save_now:
                with interval.paused():
                    self.save()
            if stop_signal:
                self.finish_saves()  # the signal's checkpoint is complete before we say so
                self._log(f"exit signal received: checkpoint saved at iteration {self.iteration}, exiting")
                return self._finished(last)
            if out_of_time:
                self._log(f"--exit-duration-in-mins {cfg.runtime.exit_duration_in_mins} reached at "
                          f"iteration {self.iteration}" + (": checkpoint saved" if save_now else ""))
                return self._finished(last)
            if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                if cfg.checkpoint.save and not save_now:  # as Megatron-LM: save, then exit
                    with interval.paused():
                        self.save()
                self._log(f"--exit-interval {cfg.exit_interval} reached at iteration {self.iteration}")
                return self._finished(last)
        if cfg.logging.eval_interval and self.iteration % cfg.logging.eval_interval != 0:
            self._run_eval()
        if cfg.checkpoint.save and not (
            cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0
        ):
            self.save()
        return self._finished(last)


    def _note_teacher_output(self, kind: str, j: Optional[int], out: torch.Tensor) -> None:
        """Flags a non-finite teacher output on the device (no host sync inside the step); the
        flag joins the step's metric reduction."""
        if not self.cfg.check_for_nan_in_loss_and_grad:
            return
        if j is None:  # not prefetched: count this kind's forwards in the step
            j = sum(1 for k, _, _ in self._teacher_flags if k == kind)
        bad = (~torch.isfinite(out.detach())).any()
        self._teacher_flags.append((kind, j, bad))
        self.metrics.add(TEACHER_NON_FINITE, bad.to(torch.float64), torch.ones((), dtype=torch.float64,
                                                                               device=bad.device),
                         replicated=False)

    def _stop_teacher_non_finite(self) -> None:
        """Collective, only after a flag: which ranks and micro-batches saw it; then stop."""
        from megatron_let.training.errors import NonFiniteError

        local = [(kind, j) for kind, j, bad in self._teacher_flags if bool(bad)]
        seen = [None] * self.world
        torch.distributed.all_gather_object(seen, (self.rank, local))
        where = "; ".join(f"rank {r}: " + ", ".join(f"{kind} of micro-batch {j}" for kind, j in items)
                          for r, items in seen if items)
        raise NonFiniteError(
            f"the teacher's output is non-finite (NaN/inf) at iteration {self.iteration} ({where}): "
            f"teacher {self.cfg.teacher.path}. Its weights are finite (checked at load), so its "
            "forward overflowed on this batch; the student's values are not the cause. Nothing of "
            "this step was saved; check the teacher's dtype and config (e.g. run it in float32), "
            "then resume from the last checkpoint")

    def _stop_non_finite(self, reduced: Dict[str, float], step_stats: Dict[str, float]) -> None:
        from megatron_let.training.errors import NonFiniteError

        seen = dict(reduced, **step_stats)
        bad = "; ".join(f"{name} = {seen.get(name, float('nan'))} on rank{'s' if len(r) > 1 else ''} "
                        f"{','.join(map(str, r))}" for name, r in self.metrics.non_finite.items())
        raise NonFiniteError(
            f"non-finite values at iteration {self.iteration}: {bad}. Nothing of this step was "
            "saved; lower --lr, check the data and the teacher, resume from the last checkpoint "
            "(--no-check-for-nan-in-loss-and-grad disables this check)")

    def _iterator(self, use_selection: bool) -> Union[Iterator, List[Iterator]]:
        if use_selection:
            return self._per_chunk(lambda: self._make_iterator(
                self.train_ds, consumed_samples=self.consumed_selection_samples,
                selection_index=self.selection))
        return self._per_chunk(lambda: self._make_iterator(
            self.train_ds, consumed_samples=self.consumed_train_samples))

    def _per_chunk(self, make: callable) -> Union[Iterator, List[Iterator]]:
        """One iterator, or one per model chunk under the interleaved pipeline: each chunk's
        forward of micro-batch i reads micro-batch i from its own copy of the same stream."""
        if len(self.model) == 1:
            return make()
        return [make() for _ in self.model]

    def _teacher_share(self, step_time: float) -> float:
        t = torch.tensor([self._step_teacher_time(), step_time], dtype=torch.float64,
                         device=self._collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t[0] / t[1]) if t[1] > 0 else 0.0

    def _teacher_counts(self) -> Dict[str, float]:
        """Teacher forwards this step: the most on any rank (⌈m/TP⌉ with the TP split, m without)
        and the total over all ranks (m per TP group and teacher stage with the split)."""
        counts = torch.zeros(self.world, dtype=torch.float64, device=self._collective_device())
        counts[self.rank] = self.teacher_microbatches
        torch.distributed.all_reduce(counts)
        self.teacher_microbatches = 0
        return {"teacher micro-batches": float(counts.max()),
                "teacher micro-batches total": float(counts.sum())}

    def _run_eval(self) -> None:
        ev = self.evaluate()
        self.writer.scalars(self.iteration, {"lm loss": ev["lm loss"], "ppl": ev["ppl"]}, prefix="valid/")
        self._log(
            f" validation at iteration {self.iteration:8d} | lm loss: {ev['lm loss']:.6E} | "
            f"lm loss PPL: {ev['ppl']:.6E}", last_rank=True,
        )

    def _run_downstream_eval(self) -> None:
        """Limited one-shot lm-eval of the model being trained (paper figures' downstream curves)."""
        from megatron_let.evaluation.downstream import PAPER_TASKS, run_downstream_eval

        lg = self.cfg.logging
        t0 = time.time()
        with self._params_synced():
            summary = run_downstream_eval(self.student, self.cfg.model, self.tokenizer,
                                          tasks=lg.eval_downstream_tasks or PAPER_TASKS,
                                          limit=lg.eval_downstream_limit,
                                          micro_batch_size=self.cfg.batch.micro_batch_size)
        values = {f"{task}/{metric}": value for task, metrics in summary["tasks"].items()
                  for metric, value in metrics.items()}
        values["average"] = summary["average"]
        self.writer.scalars(self.iteration, values, prefix="downstream/")
        table = " | ".join(f"{t}: {m.get('acc', float('nan')):.3f}" for t, m in summary["tasks"].items())
        self._log(f" downstream at iteration {self.iteration:8d} | average acc: {summary['average']:.4f}"
                  f" | {table} ({time.time() - t0:.0f}s)", last_rank=True)

    def _console_line(self, v: Dict[str, float], per_iter: float) -> None:
        n = self.cfg.batch.train_iters
        parts = [
            f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {self.iteration:8d}/{n:8d}",
            f"consumed samples: {self.consumed_train_samples:12d}",
            f"elapsed time per iteration (ms): {per_iter * 1000:.1f}",
            f"learning rate: {v['lr']:.6E}",
            f"global batch size: {self.global_batch_size:5d}",
        ]
        for key in self.CONSOLE_LOSSES:
            if key in v:
                parts.append(f"{key}: {v[key]:.6E}")
        for key in ("lambda", "kd weight"):
            if key in v:
                parts.append(f"{key}: {v[key]:.4f}")
        parts.append(f"grad norm: {v['grad norm']:.3f}")
        parts.append(f"tokens/s: {v['tokens per sec']:.0f}")
        parts += self.observer.console_parts(v, self.iteration - 1, per_iter)
        if v.get("teacher time share", 0) > 0:
            parts.append(f"teacher share: {100 * v['teacher time share']:.1f}%")
        parts.append(f"ETA {format_eta(per_iter * (n - self.iteration))}")
        self.writer.console(" | ".join(parts))

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _log(self, msg: str, all_ranks: bool = False, last_rank: bool = False) -> None:
        if all_ranks or (last_rank and self.rank == self.world - 1) or (not last_rank and self.rank == 0):
            print(f"[megatron_let] {msg}", flush=True)

    def close(self) -> None:
        if getattr(self, "observer", None) is not None:
            self.observer.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.async_saver is not None:  # normally finalised by train(); here only after errors
            self.async_saver.close()
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None
