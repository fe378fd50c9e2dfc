"""The teacher's work for one training step: shared out among the TP ranks, overlapped on GPU.

Every rank of a tensor-parallel group reads the same micro-batches, so running the whole teacher on
each of them repeats the same forward TP times. :class:`StepTeacher` instead prefetches the step's
``m`` micro-batches (:func:`prefetch_step`; the schedule then reads them from a list, in the same
order as from the data iterator) and gives micro-batch ``j`` to TP rank ``j % TP``: each rank runs
the teacher on ``ceil(m / TP)`` or ``floor(m / TP)`` of them. The results are exchanged in rounds of
TP micro-batches (one per rank; the last round is padded with zeros when TP does not divide m),
on a process group of its own with the TP group's ranks (:func:`new_exchange_group`), so the
student's TP collectives do not queue behind it:

* LET (teacher hidden states for student layer k): an all-gather of ``[b, s, d]``; under sequence
  parallelism an all-to-all that moves only the shards, so each rank receives (and holds) only its
  ``s / TP`` positions of every micro-batch.
* KD (rkd/salt, teacher logits): the teacher's *final hidden state* ``[b, s, d]`` is all-gathered
  (it is small next to the logits) and each rank multiplies it by its own rows of the teacher's LM
  head when the student needs micro-batch j (:meth:`HFTeacher.head_logits`): the full-vocabulary
  logits never exist. A family whose logits the sliced head does not reproduce falls back to the
  replicated path for the logits (the check runs once, on micro-batch 0, which every rank holds, so
  all ranks decide alike).

Memory held per step: ``m * b * s(/TP under SP for LET) * d_teacher * bytes`` (see the dry run).

On GPU with ``overlap`` the step's teacher forwards and exchanges are enqueued on a side CUDA
stream at the start of the step; one event per micro-batch marks its states ready, and the main
stream waits on it (``wait_event``, no host sync) right before the student needs them. Tensors made
on the side stream and read on the main one are ``record_stream``-ed so the caching allocator does
not reuse their memory early. On CPU ``overlap`` does nothing.

Nothing in :meth:`StepTeacher.begin_step` waits for the device (else the host would block until
the teacher forwards are done and nothing would overlap): first the host work - LET†'s
re-tokenisation and alignment indices (:class:`~megatron_let.teacher.token_alignment.TokenAligner`)
- then the inputs' copies to the device, enqueued on the *main* stream with ``non_blocking`` (from
the loader's pinned memory they are asynchronous), then the side stream waits on the main one and
the teacher's work is enqueued behind it. The head-fidelity check (:meth:`HFTeacher.sliced_head_ok`,
one eager forward and a host comparison) runs once per teacher, on the main stream, before that.

With an aligner (LET†) the step is always prefetched, so that the host work of all micro-batches
happens before any stream work rather than inside a micro-batch's forward.

Without split or overlap (TP=1 on CPU, ``--no-teacher-tp-split``) the teacher runs inline, when the
student's forward of the micro-batch needs it, exactly as before this module existed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch


class StepBatches:
    """Iterator over one step's prefetched micro-batches; ``index`` is the last one handed out."""

    def __init__(self, batches: List[dict]) -> None:
        self.batches = batches
        self.index = -1

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> dict:
        if self.index + 1 >= len(self.batches):
            raise StopIteration
        self.index += 1
        return self.batches[self.index]


def prefetch_step(data_iterator: Union[Iterator, List[Iterator]], num_microbatches: int
                  ) -> Tuple[List[dict], Union[StepBatches, List[StepBatches]]]:
    """Read the step's micro-batches; return them and the iterator(s) the schedule reads instead
    (one per model chunk under the interleaved pipeline, each a copy of the same stream)."""
    if isinstance(data_iterator, list):
        per_chunk = [StepBatches([next(it) for _ in range(num_microbatches)]) for it in data_iterator]
        return per_chunk[0].batches, per_chunk
    step = StepBatches([next(data_iterator) for _ in range(num_microbatches)])
    return step.batches, step


def new_exchange_group(tp_group):
    """A process group of the same ranks as this rank's TP group, for the teacher's exchange.

    On NCCL the collectives of one communicator run in issue order: on the student's TP group the
    student's first TP collective of the step would wait behind every round of the teacher's
    exchange (enqueued at the step's start on the side stream). A group of its own lets them run
    side by side. ``new_group`` is collective over the whole world: every rank creates every TP
    group's twin, in the same (sorted) order, so call this on all ranks at set-up."""
    world = torch.distributed.get_world_size()
    mine = tuple(torch.distributed.get_process_group_ranks(tp_group))
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    own = None
    for ranks in sorted(set(map(tuple, every))):
        group = torch.distributed.new_group(list(ranks))
        if ranks == mine:
            own = group
    return own


def owned_microbatches(num_microbatches: int, tp_size: int, tp_rank: int) -> List[int]:
    """Micro-batches whose teacher forward this TP rank runs: ``j % tp_size == tp_rank``."""
    return list(range(tp_rank, num_microbatches, tp_size))


@dataclass
class StepWork:
    """What the teacher computes on this rank in this step."""
    hidden: bool  # states for student layer k (this rank holds k)
    logits: bool  # the KD logits slice (this rank holds the last stage)
    vocab_range: Optional[Tuple[int, int]] = None


class StepTeacher:
    """Serves the teacher's per-micro-batch outputs to the trainer's forward step."""

    def __init__(self, teacher, aligner=None, *, tp_group=None, split: bool = False,
                 sequence_parallel: bool = False, overlap: bool = False,
                 timer: Optional[Callable] = None) -> None:
        self.teacher = teacher
        self.aligner = aligner  # LET†: the teacher reads its own tokenization
        if split and tp_group is None:  # the default group would be the whole world
            raise ValueError("StepTeacher(split=True) needs the TP ranks' exchange group")
        self.group = tp_group
        self.tp_size = torch.distributed.get_world_size(tp_group) if split else 1
        self.tp_rank = torch.distributed.get_rank(tp_group) if split else 0
        self.split = split and self.tp_size > 1
        self.sequence_parallel = sequence_parallel
        self.overlap = overlap and teacher.device.type == "cuda"
        self.timer = timer or contextlib.nullcontext
        self._stream = torch.cuda.Stream(device=teacher.device) if self.overlap else None
        self.forwards = 0  # teacher forwards on this rank in the current step
        self.streams_used: set = set()  # CUDA streams the teacher forwards ran on (tests read it)
        self._reset()

    @property
    def eager(self) -> bool:
        """Whether the step's teacher work runs at its start (else inline, per micro-batch); with
        an aligner (LET†) always, so its host work precedes any stream work."""
        return self.split or self.overlap or self.aligner is not None

    def _reset(self) -> None:
        self.work: Optional[StepWork] = None
        self._hidden: Dict[int, torch.Tensor] = {}
        self._final: Dict[int, torch.Tensor] = {}
        self._events: Dict[int, object] = {}
        self._inputs: Dict[int, tuple] = {}  # per micro-batch: the teacher's inputs on its device
        self._logits_inline = False

    # ------------------------------------------------------------------ step start
    def begin_step(self, batches: Optional[List[dict]], work: Optional[StepWork]) -> None:
        """Run (or, with overlap, enqueue) this step's teacher work on ``batches``."""
        self._reset()
        self.forwards = 0
        self.work = work
        if batches is None or work is None or not self.eager or not (work.hidden or work.logits):
            return
        m = len(batches)
        mine = owned_microbatches(m, self.tp_size, self.tp_rank) if self.split else list(range(m))
        # 1. host work: LET† re-tokenises the student's text on the host (never inside a stream)
        host = {j: self._host_inputs(batches[j]["tokens"], work) for j in mine}
        # 2. the copies, enqueued on the main stream (asynchronous from pinned memory)
        self._inputs = {j: tuple(self._to_device(t) for t in host[j]) for j in mine}
        if work.logits:
            # the sliced LM head must reproduce the family's logits on every path that builds them
            # from the final hidden state (checked once per teacher); the probe is micro-batch 0,
            # the same on every rank, so every rank takes the same branch
            probe = self._inputs[0][0] if 0 in self._inputs else self._to_device(batches[0]["tokens"])
            self._logits_inline = not self.teacher.sliced_head_ok(probe)
        if self.overlap:
            main = torch.cuda.current_stream(self.teacher.device)
            self._stream.wait_stream(main)  # teacher weights / inputs written on the main stream
            for inputs in self._inputs.values():
                for t in inputs:  # allocated on the main stream, read on the side one
                    t.record_stream(self._stream)
            with torch.cuda.stream(self._stream):
                self._run(batches, work, mine)
        else:
            self._run(batches, work, mine)

    def _host_inputs(self, tokens: torch.Tensor, work: StepWork) -> tuple:
        """The micro-batch's teacher inputs on the host: its tokens, and under LET† the teacher's
        own ids, attention mask and student-to-teacher index (tokenised here, on the host)."""
        if self.aligner is not None and work.hidden:
            return (tokens, *self.aligner.teacher_inputs(tokens.cpu()))
        return (tokens,)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.teacher.device, non_blocking=True)

    def _run(self, batches: List[dict], work: StepWork, mine: List[int]) -> None:
        with self.timer():
            if work.hidden:
                own = self._own_forwards(self._forward_hidden_prepared, mine)
                self._hidden = self._exchange(own, batches, self.teacher.hidden_size,
                                              shard_sequence=self.sequence_parallel)
            if work.logits and not self._logits_inline:
                own = self._own_forwards(self._forward_final_prepared, mine)
                self._final = self._exchange(own, batches, self.teacher.final_hidden_size,
                                             shard_sequence=False)

    def _own_forwards(self, forward: Callable, mine: List[int]) -> Dict[int, torch.Tensor]:
        own = {}
        for j in mine:
            own[j] = forward(j)
            if self.overlap and not self.split:  # replicated: ready right after its forward
                self._events[j] = self._record_event()
        return own

    def _forward_hidden_prepared(self, j: int) -> torch.Tensor:
        inputs = self._inputs[j]
        if len(inputs) == 1:
            return self._forward_hidden(inputs[0])
        self._note_stream()
        _, ids, mask, index = inputs
        return self.aligner.gather_hidden(self.teacher, ids, mask, index)

    def _forward_final_prepared(self, j: int) -> torch.Tensor:
        return self._forward_final(self._inputs[j][0])

    def _record_event(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.teacher.device))
        return event

    def _exchange(self, own: Dict[int, torch.Tensor], batches: List[dict], width: int,
                  shard_sequence: bool) -> Dict[int, torch.Tensor]:
        """Every micro-batch's teacher tensor on every rank (or this rank's sequence shard of it)."""
        if not self.split:
            if shard_sequence:
                raise AssertionError("sequence shards are taken by the capture without a split")
            return own
        m, tp, rank = len(batches), self.tp_size, self.tp_rank
        shape = tuple(batches[0]["tokens"].shape) + (width,)
        for j, b in enumerate(batches):
            if tuple(b["tokens"].shape) + (width,) != shape:
                raise RuntimeError(
                    f"micro-batch {j} has tokens of shape {tuple(b['tokens'].shape)}, micro-batch 0 "
                    f"{shape[:2]}: the teacher states exchanged in the TP group need equal shapes "
                    "(--no-teacher-tp-split runs the teacher on every rank)")
        rows, seq = shape[0], shape[1]
        if shard_sequence and seq % tp:
            raise RuntimeError(f"--seq-length {seq} is not divisible by the TP size {tp} "
                               "under --sequence-parallel")
        dtype = self.teacher.dtype
        out: Dict[int, torch.Tensor] = {}
        for first in range(0, m, tp):
            j_mine = first + rank
            x = own[j_mine] if j_mine < m else torch.zeros(shape, dtype=dtype,
                                                          device=self.teacher.device)
            x = x.to(dtype).contiguous()
            if shard_sequence:
                # [tp, b, s/tp, d]: row u goes to rank u; received row t is micro-batch first+t
                send = x.view(rows, tp, seq // tp, width).transpose(0, 1).contiguous()
                recv = torch.empty_like(send)
                torch.distributed.all_to_all_single(recv, send, group=self.group)
            else:
                recv = torch.empty((tp * rows, seq, width), dtype=dtype, device=x.device)
                torch.distributed.all_gather_into_tensor(recv, x, group=self.group)
                recv = recv.view(tp, rows, seq, width)
            for t in range(tp):
                if first + t < m:
                    out[first + t] = recv[t]
            if self.overlap:  # this round's micro-batches are ready once its collective is
                event = self._record_event()
                for t in range(tp):
                    self._events[first + t] = event
        return out

    # ------------------------------------------------------------------ teacher forwards
    def _note_stream(self) -> None:
        self.forwards += 1
        if self.teacher.device.type == "cuda":
            self.streams_used.add(torch.cuda.current_stream(self.teacher.device).stream_id)

    def _forward_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        self._note_stream()
        tokens = self._to_device(tokens)
        if self.aligner is not None:
            return self.aligner.teacher_hidden(self.teacher, tokens)
        return self.teacher.hidden_states(tokens)

    def _forward_final(self, tokens: torch.Tensor) -> torch.Tensor:
        self._note_stream()
        return self.teacher.final_hidden_states(self._to_device(tokens))

    # ------------------------------------------------------------------ per micro-batch
    def _ready(self, j: int, t: torch.Tensor) -> torch.Tensor:
        if self.overlap:
            main = torch.cuda.current_stream(self.teacher.device)
            main.wait_event(self._events[j])
            t.record_stream(main)  # allocated on the side stream, read on the main one
        return t

    def hidden(self, j: Optional[int], tokens: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """Teacher states of micro-batch ``j`` and whether they are already this rank's sequence
        shard (``[b, s/TP, d]``); computed now when the step's work is not prefetched."""
        if j is not None and j in self._hidden:
            return self._ready(j, self._hidden[j]), self.split and self.sequence_parallel
        with self.timer():
            return self._forward_hidden(tokens), False

    def logits(self, j: Optional[int], tokens: torch.Tensor,
               vocab_range: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Teacher logits of micro-batch ``j`` (the ``vocab_range`` columns)."""
        if j is not None and j in self._final:
            final = self._ready(j, self._final[j])
            with self.timer():
                return self.teacher.head_logits(final, vocab_range)
        with self.timer():
            self._note_stream()
            return self.teacher.logits(tokens, vocab_range=vocab_range)

    def end_step(self) -> None:
        """Drop the step's states (they are referenced by nothing after the schedule)."""
        self._reset()


def teacher_state_bytes(num_microbatches: int, micro_batch_size: int, seq_length: int,
                        hidden_size: int, dtype_bytes: int, tp_size: int,
                        sequence_parallel: bool, shard_sequence: bool = True) -> int:
    """Bytes held for one step's exchanged teacher states on one rank (module doc)."""
    seq = seq_length // tp_size if (sequence_parallel and shard_sequence and tp_size > 1) else seq_length
    return num_microbatches * micro_batch_size * seq * hidden_size * dtype_bytes
