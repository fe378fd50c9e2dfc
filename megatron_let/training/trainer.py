"""The training loop: a thin orchestrator over megatron-core (schedules, DDP, optimizer, checkpoints).

It knows nothing about any particular objective: it asks the active objective what it needs
(:class:`~megatron_let.objectives.base.Needs`); the teacher's lifecycle (where it is loaded, the
layer-k capture, its step's work, timing and release) is :class:`~megatron_let.teacher.lifecycle.
TeacherLifecycle`, the checkpoints' glue :class:`~megatron_let.training.run_checkpoints.RunCheckpoints`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from functools import partial
from typing import Dict, Iterator, List, Union

import torch
# modules whose functions tests replace (monkeypatch) are called through the module
from megatron.core import parallel_state, pipeline_parallel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_let.data.datasets import build_data_iterator
from megatron_let.data.run_datasets import build_run_datasets, load_selection
from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.evaluation.downstream import PAPER_TASKS, run_downstream_eval
from megatron_let.runtime import device as runtime_device
from megatron_let.teacher.lifecycle import TeacherLifecycle, check_teacher
from megatron_let.teacher.step_prefetch import StepBatches
from megatron_let.training import megatron_compat
from megatron_let.training.arguments import RunConfig
from megatron_let.training.errors import non_finite_error
from megatron_let.training.estimates import flops_scalars, run_flops
from megatron_let.training.metrics import (
    IntervalAverage,
    IntervalTimer,
    MetricAccumulator,
    MetricsWriter,
    format_eta,
    peak_memory_mb,
)
from megatron_let.training.model_setup import build_model_and_optimizer
from megatron_let.training.observability import named_range, observer_for_run
from megatron_let.training.preflight import preflight
from megatron_let.training.run_checkpoints import RunCheckpoints, StopSignals, checkpoint_record


class Trainer:
    # printed on the console as their mean over the log interval
    CONSOLE_LOSSES = ("lm loss", "total loss", "align loss", "cosine similarity", "kd loss")

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_train_samples = 0
        self.consumed_selection_samples = 0
        self.teacher = None  # the teacher's lifecycle (TeacherLifecycle), made by setup()
        self.needs_teacher_ever = False  # these three: validate_teacher() (the preflight)
        self.teacher_info = None
        self.aligner = None
        self.checkpoints = None  # RunCheckpoints, made by setup()
        self.metrics = MetricAccumulator()
        self._forward_only = False
        self._grad_norm_known = False  # set by each _train_step (tests may replace it)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        # first: a stop signal that arrives during set-up is kept for the first step boundary
        # (SIGUSR1's default action would kill the worker)
        self.signals = StopSignals(cfg.checkpoint.exit_signal_handler)
        self._start_time = time.time()  # --exit-duration-in-mins counts from here
        self.device = runtime_device.resolve_device(cfg.device)
        self.use_cpu = self.device.type == "cpu"
        # everything --dry-run checks, before any compute: sets self.tokenizer and self.objective
        self.preflight = preflight(cfg, self)

        timeout = cfg.runtime.distributed_timeout_minutes  # --distributed-timeout-minutes
        runtime_device.initialize_distributed(self.device, cfg.parallel, cfg.seed,
                                              **({"timeout_minutes": timeout} if timeout else {}))
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = cfg.batch.num_microbatches(self.dp_size)
        self.global_batch_size = cfg.batch.micro_batch_size * self.dp_size * self.num_microbatches
        self.is_first_stage = parallel_state.is_pipeline_first_stage()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.checkpoints = RunCheckpoints(cfg, self.rank, self._collective_device(), self._log)
        self.checkpoints.start()  # the --save lock, before any compute
        self.objective.context.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.teacher = TeacherLifecycle(  # collective: the teacher exchange's group
            TeacherLifecycle.Config.from_run(cfg), self.objective, self.metrics, self.device, self._log,
            used=self.needs_teacher_ever, aligner=self.aligner)
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
                cfg, self.objective, self.teacher_info, self.world,
                self.global_batch_size)), prefix="config/")
        self.observer = observer_for_run(cfg, self.objective, self.teacher_info,
                                         self.rank, self.world, self.global_batch_size, self.device)

        built = build_model_and_optimizer(cfg, self.preflight.spec, self.use_cpu,
                                          self.global_batch_size, self._log)
        self.student_chunks, self.model = built.student_chunks, built.model
        self.optimizer, self.scheduler = built.optimizer, built.scheduler
        # the whole stage without interleaving (the in-training downstream eval, which refuses
        # --num-layers-per-virtual-pipeline-stage, scores it)
        self.student = self.student_chunks[0]
        self.teacher.attach(self.student_chunks)
        self._build_data()
        self._load_checkpoint()
        self.teacher.update(self.iteration)

    def build_tokenizer(self):
        d = self.cfg.data
        if d.mock_data and not d.tokenizer_type:
            return build_tokenizer("NullTokenizer", None, vocab_size=d.vocab_size)
        return build_tokenizer(d.tokenizer_type, d.tokenizer_model, vocab_size=d.vocab_size)

    def validate_teacher(self) -> None:
        """Teacher path, layer range and vocabulary are checked before any weight is loaded."""
        check = check_teacher(self.cfg, self.objective, self.tokenizer)
        self.needs_teacher_ever, self.teacher_info, self.aligner = check.used, check.info, check.aligner

    def _build_data(self) -> None:
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
    def _load_checkpoint(self) -> None:
        extra = self.checkpoints.load(self.student_chunks, self.optimizer, self.scheduler)
        if extra is None:
            return
        self.iteration = int(extra["iteration"])
        self.consumed_train_samples = int(extra["consumed_train_samples"])
        self.consumed_selection_samples = int(extra.get("consumed_selection_samples", 0))
        self.objective.load_state_dict(extra.get("objective_state") or {}, self.iteration)

    def save(self) -> None:
        record = checkpoint_record(self.cfg, self.iteration, self.consumed_train_samples,
                                   self.consumed_selection_samples, self.objective)
        self.checkpoints.save(self.iteration, record, self.student_chunks, self.optimizer,
                              self.scheduler, self._params_synced)

    def _finished(self, last: Dict[str, float]) -> Dict[str, float]:
        self.finish_saves()
        return last

    def finish_saves(self) -> None:
        """Collective: finalise an asynchronous save still being written (before any exit)."""
        self.checkpoints.finish()

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

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        # the micro-batch's index in the step when its teacher work was prefetched
        j = data_iterator.index if isinstance(data_iterator, StepBatches) else None
        # asynchronous from the loader's pinned memory (CUDA): no host sync per micro-batch
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        # under the interleaved pipeline the schedule calls this once per chunk and micro-batch
        chunk = next(i for i, m in enumerate(self.model) if m is model)
        post_process = self.student_chunks[chunk].post_process
        teacher_logits = None if self._forward_only else self.teacher.micro_batch(
            j, tokens, loss_mask, chunk, post_process)
        # NLL-only objectives and evaluation pass the labels: megatron-core computes the (vocab-
        # parallel) cross entropy inside the model, as Megatron-LM does, so the model returns the
        # per-token loss and no [b, s, V] copy of the logits (transposed, upcast to fp32) is made.
        labels = batch["labels"].to(self.device, non_blocking=True) if post_process and not self._reads_logits() else None
        output = model(tokens, position_ids, None, labels=labels)
        self.teacher.after_forward(chunk)
        return output, partial(self._loss_func, batch, teacher_logits, nll_in_output=labels is not None)

    def _reads_logits(self) -> bool:
        """This step's output loss reads the logits themselves (KD), not only their NLL."""
        return not self._forward_only and self.objective.needs(self.iteration).logits

    def _loss_func(self, batch: Dict[str, torch.Tensor], teacher_logits, output: torch.Tensor,
                   nll_in_output: bool = False):
        """``output``: the logits ``[b, s, V/TP]``, or with ``nll_in_output`` the per-token NLL
        ``[b, s]`` that the model computed from the labels (:meth:`_forward_step`)."""
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
                cross_entropy = megatron_compat.fused_cross_entropy(self.cfg.perf.cross_entropy_fusion_impl)
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
        self._forward_only = False
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward = pipeline_parallel.get_forward_backward_func()
        data_iterator = self.teacher.begin_step(data_iterator, self.iteration, self.num_microbatches)
        with self.observer.timers("forward-backward"):
            forward_backward(
                forward_step_func=self._forward_step, data_iterator=data_iterator, model=self.model,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.batch.micro_batch_size, forward_only=False,
            )
        if getattr(self, "step_hooks", None) is not None:
            self.step_hooks.after_forward_backward()  # --empty-unused-memory-level
        self.teacher.end_step(self.num_microbatches)
        with self.observer.timers("optimizer"):
            update_ok, grad_norm, _ = self.optimizer.step()
        self._grad_norm_known = grad_norm is not None  # None with --clip-grad 0: nothing to check
        if update_ok:
            self.scheduler.step(increment=1)
        return {"grad norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if update_ok else 1.0}

    def evaluate(self) -> Dict[str, float]:
        self._forward_only = True
        for chunk in self.model:
            chunk.eval()
        # the same held-out batches at every evaluation, so validation curves are comparable
        iterator = self._per_chunk(lambda: self._make_iterator(self.valid_ds, consumed_samples=0))
        forward_backward = pipeline_parallel.get_forward_backward_func()
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
                        *self.objective.metric_names, *self.teacher.metric_names()]
        self._log(
            f"training {cfg.objective} for {cfg.batch.train_iters} iterations from iteration "
            f"{self.iteration}: global batch {self.global_batch_size} = micro {cfg.batch.micro_batch_size}"
            f" x dp {self.dp_size} x {self.num_microbatches} micro-batches, seq {cfg.model.seq_length}"
        )
        self.step_hooks = megatron_compat.StepHooks(cfg.runtime, self.device, self._start_time)
        self.step_hooks.start()  # --manual-gc
        # tests slow steps down to land a SIGKILL between checkpoints
        test_sleep = float(os.environ.get("MEGATRON_LET_TEST_STEP_SLEEP", "0"))
        while self.iteration < cfg.batch.train_iters:
            if test_sleep:
                time.sleep(test_sleep)
            self.teacher.update(self.iteration)
            use_selection = self.selection is not None and self.objective.needs(
                self.iteration).kd_data_selection
            if use_selection is not on_selection:  # SALT_DS: KD steps read the selection
                iterator = self._iterator(use_selection)
                on_selection = use_selection
            t0 = time.time()
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
            self.teacher.check_outputs(reduced, self.iteration)  # before the student's NaN it causes
            if self.metrics.non_finite:  # before anything of this step is logged or saved
                raise non_finite_error(self.iteration, self.metrics.non_finite, dict(reduced, **step_stats))
            self.checkpoints.after_step()
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
            values.update(self.teacher.step_values(step_time))  # after reduce: synced
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

    def _run_eval(self) -> None:
        ev = self.evaluate()
        self.writer.scalars(self.iteration, {"lm loss": ev["lm loss"], "ppl": ev["ppl"]}, prefix="valid/")
        self._log(
            f" validation at iteration {self.iteration:8d} | lm loss: {ev['lm loss']:.6E} | "
            f"lm loss PPL: {ev['ppl']:.6E}", last_rank=True,
        )

    def _run_downstream_eval(self) -> None:
        """Limited one-shot lm-eval of the model being trained (paper figures' downstream curves)."""
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
        if self.checkpoints is not None:  # releases the --save lock
            self.checkpoints.close()
