"""The teacher's life in a training run, in one place (the trainer calls a handful of methods).

:class:`TeacherLifecycle` owns

- **when**: the teacher is loaded on the ranks whose model chunks need it (layer k's stage for
  LET, the last stage for logit distillation) and released once no later step needs it (S_stop:
  objectives' schedules only switch the teacher off), freeing its weights and, with
  ``--teacher-compile``, its compiled graphs (``HFTeacher.release``);
- **where the capture sits**: :class:`~megatron_let.training.layer_capture.LayerCapture` on the
  model chunk that holds student layer k, with the alignment loss under its named range and the
  objective's gradient weight (``--let-lambda-mode grad-ratio``);
- **the step's work**: the prefetch of a step's micro-batches and the teacher's forwards on them,
  split among the TP ranks over the exchange's own group (:mod:`megatron_let.teacher.step_prefetch`);
- **its timing and counts**: CUDA events on GPU (the host clock would time the queue of student
  work), wall clock on CPU; forwards per rank; the share of the step's time;
- **non-finite outputs**: a device flag per micro-batch (no host sync in the step) that joins the
  step's metric reduction, and the error that names the ranks and micro-batches that saw one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch
from megatron.core import parallel_state

from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.objectives.base import Needs
from megatron_let.runtime.device import resolve_device
from megatron_let.teacher import HFTeacher, TeacherConfig, check_vocab_compatible, inspect_teacher
from megatron_let.teacher.compile import check_compile_available
from megatron_let.teacher.step_prefetch import StepTeacher, StepWork, new_exchange_group, prefetch_step
from megatron_let.teacher.token_alignment import TokenAligner
from megatron_let.training.errors import NonFiniteError
from megatron_let.training.layer_capture import LayerCapture, find_layer_in_chunks
from megatron_let.training.observability import named_range

TEACHER_NON_FINITE = "teacher output non-finite"  # micro-batches whose teacher output had NaN/inf


@dataclasses.dataclass
class TeacherCheck:
    """What the preflight learns about the run's teacher before any weight is loaded."""

    used: bool  # some step needs the teacher (schedules only switch it off, so step 0 decides)
    info: object = None  # the folder's TeacherInfo (inspect_teacher)
    aligner: Optional[TokenAligner] = None  # --let-tokenizer-mismatch: the teacher's own tokenizer


def check_teacher(cfg, objective, tokenizer) -> TeacherCheck:
    """Teacher path, layer range and vocabulary are checked before any weight is loaded."""
    needs = objective.needs(0)
    if not needs.teacher:
        if cfg.teacher.compile:
            raise ValueError(f"--teacher-compile: --objective {cfg.objective} runs no teacher")
        return TeacherCheck(used=False)
    if not cfg.teacher.path:
        raise ValueError(f"--objective {cfg.objective} needs --teacher-path")
    if cfg.teacher.compile:  # before any compute: the compiler torch.compile needs here
        check_compile_available(resolve_device(cfg.device))
    layer = needs.teacher_hidden_layer if needs.teacher_hidden_layer is not None else -1
    info = inspect_teacher(cfg.teacher.path, layer=layer, trust_remote_code=cfg.teacher.trust_remote_code,
                           seq_length=cfg.model.seq_length, bos=cfg.teacher.bos)
    if cfg.teacher.tokenizer_mismatch:
        if needs.teacher_logits:
            raise ValueError("--let-tokenizer-mismatch aligns hidden states only; logit "
                             f"distillation (--objective {cfg.objective}) needs a shared vocabulary")
        aligner = TokenAligner(tokenizer, build_tokenizer("HuggingFaceTokenizer", cfg.teacher.path))
        return TeacherCheck(used=True, info=info, aligner=aligner)
    check_vocab_compatible(info.vocab_size, cfg.model.vocab_size,
                           cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
                           info.tokenizer_size)
    return TeacherCheck(used=True, info=info)


class TeacherLifecycle:
    """The run's teacher: loaded, captured against, run, timed, counted and released.

    Per step the trainer calls :meth:`update` (load/release), :meth:`begin_step` (prefetch, the
    teacher's share of work), :meth:`micro_batch` and :meth:`after_forward` around each model
    chunk's forward, :meth:`end_step`, then :meth:`check_outputs` on the reduced metrics and
    :meth:`step_values` for the log. Without a teacher every call is a no-op (the share is 0)."""

    @dataclasses.dataclass
    class Config:
        path: Optional[str] = None
        trust_remote_code: bool = False
        bos: bool = True
        compile: bool = False
        tp_split: Optional[bool] = None  # None: on when TP > 1
        overlap: Optional[bool] = None  # None: on with CUDA
        sequence_parallel: bool = False
        check_non_finite: bool = True  # --check-for-nan-in-loss-and-grad

        @classmethod
        def from_run(cls, cfg) -> "TeacherLifecycle.Config":
            t = cfg.teacher
            return cls(path=t.path, trust_remote_code=t.trust_remote_code, bos=t.bos, compile=t.compile,
                       tp_split=t.tp_split, overlap=t.overlap,
                       sequence_parallel=cfg.parallel.sequence_parallel,
                       check_non_finite=cfg.check_for_nan_in_loss_and_grad)

    def __init__(self, config: "TeacherLifecycle.Config", objective, metrics, device: torch.device,
                 log: Callable[..., None], *, used: bool = False, aligner=None) -> None:
        """``used``: some step of the run needs the teacher (:func:`check_teacher`). With the
        process group up and ``used``, this is collective (the TP exchange's group is made)."""
        self.config = config
        self.objective = objective
        self.metrics = metrics  # the trainer's MetricAccumulator
        self.device = device
        self.log = log
        self.used = used
        self.aligner = aligner
        self.loaded: Optional[HFTeacher] = None  # the teacher, on the ranks and steps that need it
        self.capture: Optional[LayerCapture] = None
        self.capture_chunk: Optional[int] = None  # the model chunk holding student layer k
        self.step_teacher: Optional[StepTeacher] = None  # the teacher's work per step
        self.student_chunks: List = []
        self.iteration = 0  # the step being run (the alignment and its weight read it)
        self.time = 0.0  # seconds of teacher forwards in this step
        self.forwards = 0  # teacher forwards on this rank in the last step
        self._events = []  # (start, end) CUDA events of this step's teacher forwards
        self._flags = []  # (kind, micro-batch, 0-dim "non-finite" tensor) of this step
        self.exchange_group = self._exchange_group()

    # ------------------------------------------------------------------ where and when
    def attach(self, student_chunks: List) -> None:
        """The model chunks of this rank, where the capture goes."""
        self.student_chunks = student_chunks

    def metric_names(self) -> List[str]:
        """The flag rides on the step's one metric reduction."""
        return [TEACHER_NON_FINITE] if self.config.check_non_finite and self.used else []

    def _needed_here(self, needs: Needs) -> bool:
        if needs.teacher_hidden_layer is not None and needs.student_layer is not None:
            if find_layer_in_chunks(self.student_chunks, needs.student_layer) is not None:
                return True
        return needs.teacher_logits and parallel_state.is_pipeline_last_stage()

    def update(self, step: int) -> None:
        """Load the teacher where this step needs it; release it once no later step does."""
        needs = self.objective.needs(step)
        here = self._needed_here(needs)
        c = self.config
        if here and self.loaded is None:
            layer = needs.teacher_hidden_layer if needs.teacher_hidden_layer is not None else -1
            self.loaded = HFTeacher.load(
                TeacherConfig(path=c.path, layer=layer, trust_remote_code=c.trust_remote_code,
                              bos=c.bos, compile=c.compile),
                self.device,
            )
            rank = torch.distributed.get_rank()
            self.log(f"teacher loaded on rank {rank}: {c.path}"
                     + (" (blocks under torch.compile)" if c.compile else ""), all_ranks=True)
            self.step_teacher = self._build_step_teacher()
        if needs.student_layer is not None and self.capture is None and here:
            self._install_capture(needs.student_layer)
        if not needs.teacher and self.loaded is not None:
            # Schedules only decay: once a step needs no teacher, no later step does.
            self.loaded.release()
            self.loaded = None
            self.step_teacher = None
            if self.capture is not None:
                self.capture.remove()
                self.capture = None
                self.capture_chunk = None
            self.log(f"teacher released at iteration {step}", all_ranks=False)

    def _exchange_group(self):
        """The teacher's TP exchange's own group (teacher/step_prefetch.py), made on every rank
        (new_group is collective) when the run may split the teacher among TP ranks."""
        if (not self.used or self.config.tp_split is False
                or parallel_state.get_tensor_model_parallel_world_size() == 1):
            return None
        return new_exchange_group(parallel_state.get_tensor_model_parallel_group())

    def _build_step_teacher(self) -> StepTeacher:
        c = self.config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        split = c.tp_split if c.tp_split is not None else tp > 1
        overlap = c.overlap if c.overlap is not None else self.device.type == "cuda"
        return StepTeacher(self.loaded, self.aligner, tp_group=self.exchange_group,
                           split=split and tp > 1, sequence_parallel=c.sequence_parallel,
                           overlap=overlap, timer=self._timer)

    def _install_capture(self, student_layer: int) -> None:
        self.capture_chunk, layer = find_layer_in_chunks(self.student_chunks, student_layer)
        sp = self.config.sequence_parallel

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
    def begin_step(self, data_iterator, iteration: int, num_microbatches: int):
        """Prefetch the step's micro-batches and run (or enqueue) this rank's share of the
        teacher's work on them; the schedule then reads the returned (prefetched) batches."""
        self.iteration = iteration
        self.time = 0.0
        self._flags = []
        if self.capture is not None:
            self.capture.start_step()
        st = self.step_teacher
        if st is None:
            return data_iterator
        needs = self.objective.needs(iteration)
        work = StepWork(
            hidden=self.capture is not None and needs.teacher_hidden_layer is not None,
            logits=needs.teacher_logits and any(c.post_process for c in self.student_chunks),
            vocab_range=self.objective.teacher_logits_range())
        if not st.eager or not (work.hidden or work.logits):
            st.begin_step(None, work)
            return data_iterator
        batches, data_iterator = prefetch_step(data_iterator, num_microbatches)
        st.begin_step(batches, work)
        return data_iterator

    def micro_batch(self, j: Optional[int], tokens: torch.Tensor, loss_mask: torch.Tensor,
                    chunk: int, post_process: bool) -> Optional[torch.Tensor]:
        """Before model chunk ``chunk``'s forward of micro-batch ``j`` (its index in the step
        when prefetched, else None): hands layer k's capture the teacher's states and returns the
        teacher's logits when this chunk computes the output loss (else None)."""
        if self.loaded is None:
            return None
        needs = self.objective.needs(self.iteration)
        # LET† (aligner: the teacher has its own tokenizer) is handled by the step teacher
        if self._holds_capture(chunk) and needs.teacher_hidden_layer is not None:
            hidden, sharded = self.step_teacher.hidden(j, tokens)
            self._note_output("hidden states", j, hidden)
            self.capture.set_pending(hidden, loss_mask, teacher_sharded=sharded)
        if needs.teacher_logits and post_process:
            logits = self.step_teacher.logits(j, tokens, self.objective.teacher_logits_range())
            self._note_output("logits", j, logits)
            return logits
        return None

    def after_forward(self, chunk: int) -> None:
        """After model chunk ``chunk``'s forward (training or evaluation)."""
        if self._holds_capture(chunk):
            self.capture.clear()

    def _holds_capture(self, chunk: int) -> bool:
        return self.capture is not None and chunk == self.capture_chunk

    def end_step(self, num_microbatches: int) -> None:
        """After the step's forward-backward."""
        if self.capture is not None and self.objective.needs(self.iteration).teacher_hidden_layer \
                is not None:
            # layer k's stage: the alignment loss entered the backward once per micro-batch
            self.capture.check_step(num_microbatches)
        if self.step_teacher is not None:
            self.forwards = self.step_teacher.forwards
            self.step_teacher.end_step()

    # ------------------------------------------------------------------ timing and counts
    @contextlib.contextmanager
    def _timer(self):
        """Teacher time: wall clock on CPU; CUDA events on GPU, where the host's clock would time
        the queue of student work rather than the teacher (read once per step)."""
        if self.device.type != "cuda":
            t0 = time.time()
            with named_range("teacher forward"):
                yield
            self.time += time.time() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with named_range("teacher forward"):
            yield
        end.record()
        self._events.append((start, end))

    def step_time(self) -> float:
        """Seconds of teacher forwards in this step (waits for their CUDA events)."""
        if self._events:
            for _, end in self._events:  # on the main and (overlap) the side stream
                end.synchronize()
            self.time += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events = []
        return self.time

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def step_values(self, step_time: float) -> Dict[str, float]:
        """Collective: the teacher's share of the step's time (the slowest rank's), and with a
        teacher in the run its forwards this step: the most on any rank (⌈m/TP⌉ with the TP
        split, m without) and the total over all ranks (m per TP group and teacher stage)."""
        t = torch.tensor([self.step_time(), step_time], dtype=torch.float64,
                         device=self._collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        values = {"teacher time share": float(t[0] / t[1]) if t[1] > 0 else 0.0}
        if not self.used:
            return values
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        counts = torch.zeros(world, dtype=torch.float64, device=self._collective_device())
        counts[rank] = self.forwards
        torch.distributed.all_reduce(counts)
        self.forwards = 0
        values["teacher micro-batches"] = float(counts.max())
        values["teacher micro-batches total"] = float(counts.sum())
        return values

    # ------------------------------------------------------------------ non-finite outputs
    def _note_output(self, kind: str, j: Optional[int], out: torch.Tensor) -> None:
        """Flags a non-finite teacher output on the device (no host sync inside the step); the
        flag joins the step's metric reduction."""
        if not self.config.check_non_finite:
            return
        if j is None:  # not prefetched: count this kind's forwards in the step
            j = sum(1 for k, _, _ in self._flags if k == kind)
        bad = (~torch.isfinite(out.detach())).any()
        self._flags.append((kind, j, bad))
        self.metrics.add(TEACHER_NON_FINITE, bad.to(torch.float64),
                         torch.ones((), dtype=torch.float64, device=bad.device), replicated=False)

    def check_outputs(self, reduced: Dict[str, float], iteration: int) -> None:
        """Takes the flag out of the step's reduced metrics; when any rank raised it (collective,
        only then), stops with the ranks and micro-batches that saw a non-finite output. Call it
        before the student's own non-finite check: the teacher's NaN causes the student's."""
        if reduced.pop(TEACHER_NON_FINITE, 0.0) <= 0:
            return
        local = [(kind, j) for kind, j, bad in self._flags if bool(bad)]
        seen = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(seen, (torch.distributed.get_rank(), local))
        where = "; ".join(f"rank {r}: " + ", ".join(f"{kind} of micro-batch {j}" for kind, j in items)
                          for r, items in seen if items)
        raise NonFiniteError(
            f"the teacher's output is non-finite (NaN/inf) at iteration {iteration} ({where}): "
            f"teacher {self.config.path}. Its weights are finite (checked at load), so its "
            "forward overflowed on this batch; the student's values are not the cause. Nothing of "
            "this step was saved; check the teacher's dtype and config (e.g. run it in float32), "
            "then resume from the last checkpoint")
