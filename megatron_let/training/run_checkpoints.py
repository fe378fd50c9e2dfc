"""A training run's checkpoints: the trainer's side of :mod:`megatron_let.training.checkpointing`.

:class:`RunCheckpoints` takes the ``--save`` lock, writes (``--async-save``: starts) a save with the
run's record (:func:`checkpoint_record`, the same for both kinds of save), finalises saves, and
loads ``--load`` after checking that it belongs to this run (:func:`check_compatible`,
:func:`check_data_on_resume`). :class:`StopSignals` remembers a stop signal until the loop saves.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Callable, ContextManager, Dict, Optional

import torch

from megatron_let.runtime.signal_shield import start_checkpoint_helpers
from megatron_let.training import fault_injection
from megatron_let.training.async_save import AsyncSaver
from megatron_let.training.checkpointing import (
    checkpoint_dir,
    compatibility_problems,
    incomplete_saves,
    load_checkpoint,
    recover_interrupted_saves,
    save_checkpoint,
)
from megatron_let.training.compatibility import data_problems, data_record
from megatron_let.training.errors import CheckpointError, SaveLockError
from megatron_let.training.save_lock import SaveLock


class StopSignals:
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


def padded_vocab(cfg) -> int:
    return cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)


def tokenizer_record(cfg) -> Dict:
    return {"type": cfg.data.tokenizer_type or "NullTokenizer",
            "model": cfg.data.tokenizer_model, "vocab_size": cfg.model.vocab_size}


def checkpoint_record(cfg, iteration: int, consumed_train_samples: int,
                      consumed_selection_samples: int, objective) -> Dict:
    """What a checkpoint records besides the tensors: progress, architecture, tokenizer, data and
    the objective's state (read back by --load and by the export and evaluation tools)."""
    return {"iteration": iteration, "consumed_train_samples": consumed_train_samples,
            "consumed_selection_samples": consumed_selection_samples,
            "objective": cfg.objective, "model": dataclasses.asdict(cfg.model),
            "tokenizer": tokenizer_record(cfg), "padded_vocab_size": padded_vocab(cfg),
            "data": data_record(cfg), "objective_state": objective.state_dict()}


def check_compatible(cfg, extra: Dict, path: str, log: Callable[[str], None]) -> None:
    """The checkpoint's architecture and tokenizer must be this run's; the objective may change."""
    ck = cfg.checkpoint
    problems = compatibility_problems(
        extra, cfg.model, tokenizer_record(cfg),
        # a model-only start (--no-load-optim) may train at a new sequence length
        check_seq_length=not ck.no_load_optim, padded_vocab=padded_vocab(cfg))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(problems))
    check_data_on_resume(cfg, extra, path, log)
    saved = extra.get("objective")
    if saved and saved != cfg.objective:
        log(f"objective changes from {saved} (checkpoint) to {cfg.objective}")


def check_data_on_resume(cfg, extra: Dict, path: str, log: Callable[[str], None]) -> None:
    """Another data stream than the checkpoint's is refused unless --override-data-on-resume."""
    saved = extra.get("data")
    if saved is None:
        log(f"{path} records no data settings (older megatron_let): --data-path, --split "
            "and --seed are not checked against it")
        return
    problems = data_problems(saved, data_record(cfg))
    if not problems:
        return
    if cfg.checkpoint.no_load_optim or int(extra.get("iteration", 0)) == 0:
        # a new run from these weights (the reproduction's shared initial checkpoint): no
        # sample sequence is being continued
        log("data differs from the checkpoint's (a model-only start, allowed): " + "; ".join(problems))
        return
    if not cfg.checkpoint.override_data_on_resume:
        raise CheckpointError(
            f"checkpoint {path} was trained on other data than this run: " + "; ".join(problems)
            + ". Resuming would read another sample sequence; pass --override-data-on-resume "
            "to resume on this run's data anyway")
    log("WARNING: --override-data-on-resume: resuming on other data than the checkpoint's: "
        + "; ".join(problems))


class RunCheckpoints:
    """The run's saves and its --load. ``log(msg)`` prints on rank 0 (the trainer's log)."""

    def __init__(self, cfg, rank: int, collective_device: torch.device,
                 log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.rank = rank
        self.collective_device = collective_device
        self.log = log
        self.save_lock: Optional[SaveLock] = None
        self.async_saver: Optional[AsyncSaver] = None  # --async-save

    def start(self) -> None:
        """Collective, before any compute: the save helpers, the --save lock, the async saver."""
        ck = self.cfg.checkpoint
        if ck.save:  # before a stop signal can reach them: they must outlive it
            fault_injection.install_from_env()  # test hook: a chosen write fails (ENOSPC, EIO)
            start_checkpoint_helpers()
        self._take_save_lock()
        if ck.save and ck.async_save:
            self.async_saver = AsyncSaver()

    def _take_save_lock(self) -> None:
        """Rank 0 locks --save (one writer per directory) and tidies interrupted saves, before any
        compute; the outcome is shared so that every rank stops when it fails."""
        save = self.cfg.checkpoint.save
        if not save:
            return
        error = None
        if self.rank == 0:
            try:
                self.save_lock = SaveLock(save, log=self.log)
                self.save_lock.acquire()
                self.save_lock.start_heartbeat()  # fresh through long evaluations and saves
                for action in recover_interrupted_saves(save):
                    self.log(action)
            except (SaveLockError, OSError) as e:
                if self.save_lock is not None:
                    self.save_lock.release()  # ours if taken: stop its heartbeat, remove it
                self.save_lock, error = None, e
        failed = torch.tensor([1 if error else 0], dtype=torch.int32, device=self.collective_device)
        torch.distributed.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise SaveLockError(f"rank 0 could not take the lock of --save {save} (see its error)")

    def load(self, student_chunks, optimizer, scheduler) -> Optional[Dict]:
        """The checked record of the --load checkpoint (None: nothing to load, start from scratch)."""
        ck = self.cfg.checkpoint
        if not ck.load:
            return None
        extra = load_checkpoint(ck.load, student_chunks, optimizer, scheduler,
                                load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                                ckpt_step=ck.ckpt_step, verify=ck.verify,
                                check=lambda e, p: check_compatible(self.cfg, e, p, self.log), log=self.log)
        if extra is None:
            partial_saves = incomplete_saves(ck.load)
            why = f" (incomplete, ignored: {', '.join(partial_saves)})" if partial_saves else ""
            self.log(f"no complete checkpoint under {ck.load}{why}; starting from scratch")
            return None
        if ck.no_load_optim:
            # As Megatron-LM: without the optimizer state, the mixed-precision optimizers' fp32
            # main params (copied from the random init at construction) must follow the loaded model.
            optimizer.reload_model_params()
        iteration = int(extra["iteration"])
        self.log(f"resumed from {ck.load} at iteration {iteration}"
                 + ("" if extra["_path"] in (checkpoint_dir(ck.load, iteration),
                                             os.path.normpath(ck.load)) else f" ({extra['_path']})"))
        return extra

    def save(self, iteration: int, record: Dict, student_chunks, optimizer, scheduler,
             params_synced: Callable[[], ContextManager]) -> None:
        """Writes this iteration's checkpoint (--async-save: starts it; training goes on while it is
        written) with every parameter gathered (``params_synced``)."""
        t0 = time.time()
        root = self.cfg.checkpoint.save
        if self.async_saver is None:
            with params_synced():
                path = save_checkpoint(root, iteration, student_chunks, optimizer, scheduler, record)
            self._saved(path, t0)
            return
        with params_synced():
            path = save_checkpoint(
                root, iteration, student_chunks, optimizer, scheduler, record,
                async_saver=self.async_saver,
                on_saved=lambda p, took: self._saved(
                    p, t0, f" (asynchronous save; finalising blocked training {took:.1f}s)"))
        self.log(f"writing checkpoint {path} in the background ({time.time() - t0:.1f}s to start it)")

    def _saved(self, path: str, t0: float, how: str = "") -> None:
        self.log(f"saved checkpoint {path} in {time.time() - t0:.1f}s{how}")
        if self.save_lock is not None:  # after the log line: a failure here loses no checkpoint
            self.save_lock.heartbeat(force=True)

    def after_step(self) -> None:
        """The lock's heartbeat; finalise an asynchronous save whose writers are all done."""
        if self.save_lock is not None:
            self.save_lock.heartbeat()
        if self.async_saver is not None:
            self.async_saver.poll()

    def finish(self) -> None:
        """Collective: finalise an asynchronous save still being written (before any exit)."""
        if self.async_saver is not None:
            self.async_saver.wait()

    def close(self) -> None:
        if self.async_saver is not None:  # normally finalised by train(); here only after errors
            self.async_saver.close()
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None
