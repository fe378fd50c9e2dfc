"""``--async-save``: checkpoints written in the background with megatron-core's async dist-checkpointing.

A save makes ``iter_N.tmp``, writes the small files (``common.pt``, RNG) at once and hands the shards
to a forked writer process (``AsyncCallsQueue``, non-persistent: one fork per save, which sees the
tensors as they were at the fork); training goes on. Every step all ranks :meth:`AsyncSaver.poll`
(one integer all-reduce, megatron-core's completion check); when every rank's writer is done, the
finalisation runs on all ranks: megatron-core's metadata, then ours, exactly as a synchronous save
ends (checksums, ``manifest.json`` last, rename to ``iter_N``, tracker). So the tracker and manifest
name only complete checkpoints and every state a kill leaves is one docs/reliability.md describes: a
kill before the finalisation leaves ``iter_N.tmp`` without manifest, ignored at ``--load``.

A new save first finalises the previous one (blocking), and the trainer finalises the last one
before it exits, the exit of a stop signal included. The writer is forked from the trainer, so it
inherits the trainer's SIGTERM/SIGUSR1 handlers: a signal sent to every process of the job step does
not kill it (its writers use the shielded helpers of megatron_let.runtime.signal_shield).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_let.training import checkpointing as ckpt


class AsyncSaver:
    def __init__(self) -> None:
        self.queue = AsyncCallsQueue(persistent=False)
        self.pending: Optional[Tuple[str, int, str]] = None  # (root, iteration, tmp)
        self.started = 0.0
        self.blocked_s = 0.0  # time the training loop waited for saves (start + finalisations)

    def save(self, root: str, iteration: int, state: Dict,
             on_saved: Optional[Callable[[str, float], None]] = None) -> str:
        """Collective: start writing ``root/iter_N``; returns its final path (not yet there)."""
        t0 = time.time()
        self.wait()  # one save at a time: the previous one is finalised first
        tmp, request = ckpt._start_write(root, iteration, state, with_rng=True, asynchronous=True)

        def complete() -> None:
            t1 = time.time()
            path = ckpt._complete(root, iteration, tmp)
            if on_saved is not None:
                on_saved(path, time.time() - t1)

        request.add_finalize_fn(complete)
        try:
            self.queue.schedule_async_request(request)
        except ckpt._errors() as e:
            ckpt._save_failed(e, tmp)
            raise
        self.pending = (root, iteration, tmp)
        self.started = time.time()
        self.blocked_s += time.time() - t0
        return ckpt.checkpoint_dir(root, iteration)

    def poll(self, blocking: bool = False) -> bool:
        """Collective: finalise the pending save if every rank's writer is done (``blocking``: wait
        for it). True when nothing is pending afterwards."""
        if self.pending is None:
            return True
        t0 = time.time()
        tmp = self.pending[2]
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except ckpt._errors() as e:  # a writer failed: the partial folder goes, one error line
            self.pending = None
            ckpt._save_failed(e, tmp)
            raise
        finally:
            if blocking:
                self.blocked_s += time.time() - t0
        if done:
            self.pending = None
        return self.pending is None

    def wait(self) -> None:
        """Collective: finalise the pending save, waiting for its writer."""
        self.poll(blocking=True)

    def close(self) -> None:
        """Without finalising (an error is on its way out, no collective): stop a writer still
        running; its ``iter_N.tmp`` has no manifest and is ignored, then deleted by the next run."""
        for active in list(self.queue.async_calls):
            active.async_caller.close(abort=True)
        self.queue.async_calls.clear()
        self.pending = None
