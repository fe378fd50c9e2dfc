"""Distributed checkpoints (megatron-core ``dist_checkpointing``), written atomically and verified.

Layout under ``--save DIR``::

    DIR/iter_0000100/            one complete checkpoint (torch_dist format + our extras)
    DIR/iter_0000100/rng/rank_00003.pt   per-rank RNG states (exact resume)
    DIR/iter_0000100/manifest.json       size and CRC-32 of every file, written last
    DIR/latest_checkpointed_iteration.txt   "100"; updated only after the rename

A save writes ``iter_N.tmp`` (manifest last), then on rank 0: ``iter_N`` -> ``iter_N.old`` (only
when re-saving an iteration that exists), ``iter_N.tmp`` -> ``iter_N``, tracker, delete
``iter_N.old``. A kill between any two steps leaves a state the loader understands:

* ``iter_N.tmp`` without manifest: incomplete, ignored (and deleted by the next save);
* tracker names N, ``iter_N`` missing: the interrupted re-save's complete ``iter_N.tmp`` or the
  old ``iter_N.old`` is used (and put back in place by the next writer);
* no tracker: the newest complete ``iter_*`` folder, or a fresh start when there is none.

``MEGATRON_LET_TEST_PAUSE_IN_SAVE=PHASE[@ITER]`` makes rank 0 stop forever at a named phase
(:data:`SAVE_PHASES`) so that tests can SIGKILL a run at a deterministic point of a save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import re
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from torch.distributed.checkpoint.api import CheckpointException

from megatron_let.runtime import device as device_policy
from megatron_let.training import checkpoint_integrity as integrity
from megatron_let.training import optimizer_conversion as conversion
from megatron_let.training.compatibility import model_problems, padded_vocab_problem
from megatron_let.training.errors import CheckpointError, CheckpointWriteError, DiskFullError
from megatron_let.training.optimizer_checkpoint import OPTIMIZER_METADATA, check_optimizer_format

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_PREFIX = "model."  # key prefix of the model's tensors inside a checkpoint
ITER_RE = re.compile(r"iter_(\d{7})")
PAUSE_ENV = "MEGATRON_LET_TEST_PAUSE_IN_SAVE"
SAVE_PHASES = {
    "write": "shards written into iter_N.tmp, manifest not yet",
    "written": "iter_N.tmp complete (manifest written), nothing renamed",
    "old_moved": "re-save: the existing iter_N renamed to iter_N.old, the new one not yet in place",
    "renamed": "iter_N.tmp renamed to iter_N, tracker not yet updated",
    "tracker": "tracker updated, iter_N.old not yet deleted",
}


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _test_pause(phase: str, iteration: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == phase and (not at or int(at) == iteration):
        print(f"[megatron_let] test pause in save: phase {phase} at iteration {iteration}", flush=True)
        while True:  # until the test kills us
            time.sleep(60)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- finding

def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker names, or None when there is no tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"corrupt checkpoint tracker {path}: {text!r}; "
                              + older_hint(root, None)) from None


def complete_iterations(root: str) -> List[int]:
    """Iterations with a complete ``iter_N`` folder under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = ITER_RE.fullmatch(name)
        if m and integrity.is_complete(os.path.join(root, name)):
            found.append(int(m.group(1)))
    return sorted(found)


def older_hint(root: str, iteration: Optional[int]) -> str:
    """Names the newest complete checkpoint before ``iteration`` (any, when None) and the flag."""
    older = [i for i in complete_iterations(root) if iteration is None or i < iteration]
    if not older:
        return f"there is no complete older checkpoint under {root}"
    return (f"the newest complete older checkpoint is {checkpoint_dir(root, older[-1])}: "
            f"load it with --ckpt-step {older[-1]}")


def _usable_dir(root: str, iteration: int) -> Optional[str]:
    """``iter_N``, or the complete copy an interrupted re-save of N left behind."""
    final = checkpoint_dir(root, iteration)
    if os.path.isdir(final):
        return final
    if os.path.isfile(os.path.join(final + ".tmp", integrity.MANIFEST)):
        return final + ".tmp"  # the new one, complete, killed before its rename
    if os.path.isdir(final + ".old"):
        return final + ".old"  # the previous one, moved aside
    return None


def find_checkpoint(load: str, ckpt_step: Optional[int] = None) -> Optional[Tuple[int, str, str]]:
    """``(iteration, folder, why)`` that ``--load`` (and ``--ckpt-step``) select, or None for a fresh
    start. ``load`` is a checkpoint root or one ``iter_N`` folder inside it."""
    load = os.path.normpath(load)
    m = ITER_RE.fullmatch(os.path.basename(load))
    if m:
        iteration = int(m.group(1))
        if ckpt_step is not None and ckpt_step != iteration:
            raise CheckpointError(f"--load {load} is iteration {iteration} but --ckpt-step is {ckpt_step}")
        if not os.path.isdir(load):
            raise CheckpointError(f"--load {load} does not exist; "
                                  + older_hint(os.path.dirname(load), iteration))
        return iteration, load, f"--load {load}"
    if ckpt_step is not None:
        path = _usable_dir(load, ckpt_step)
        if path is None:
            have = complete_iterations(load)
            raise CheckpointError(f"--ckpt-step {ckpt_step}: no checkpoint {checkpoint_dir(load, ckpt_step)}"
                                  f" (complete ones under {load}: {have or 'none'})")
        return ckpt_step, path, f"--ckpt-step {ckpt_step}"
    tracked = read_latest_iteration(load)
    if tracked is None:
        have = complete_iterations(load)
        if have:  # killed after the first checkpoint's rename, before its tracker
            return have[-1], checkpoint_dir(load, have[-1]), f"no {TRACKER}; newest complete checkpoint"
        nested = nested_checkpoints(load)
        if nested:  # --load at the parent of a run's folder: never a silent fresh start
            raise CheckpointError(f"--load {load} holds no checkpoint, but "
                                  + ", ".join(nested[:5]) + (" holds one" if len(nested) == 1 else
                                                             " hold checkpoints")
                                  + f": pass --load {nested[0]}")
        return None
    path = _usable_dir(load, tracked)
    if path is None:
        raise CheckpointError(f"{os.path.join(load, TRACKER)} names iteration {tracked} but "
                              f"{checkpoint_dir(load, tracked)} is missing; " + present_hint(load, tracked))
    return tracked, path, TRACKER


def present_hint(root: str, iteration: int) -> str:
    """Every complete checkpoint under ``root`` and the ``--ckpt-step`` to load one (a tracker
    that names a missing iteration may be truncated, so newer ones are listed too)."""
    have = complete_iterations(root)
    if not have:
        return f"there is no complete checkpoint under {root}"
    older = [i for i in have if i < iteration]
    pick = older[-1] if older else have[-1]
    which = "the newest older one" if older else "the newest one"
    return (f"complete checkpoints under {root}: iterations {', '.join(map(str, have))}; load "
            f"{which} with --ckpt-step {pick} (or fix the tracker)")


def nested_checkpoints(root: str, depth: int = 2) -> List[str]:
    """Folders below ``root`` (not ``root`` itself) that hold a tracker or a complete ``iter_*``:
    a ``--load`` that names their parent by mistake."""
    found = []
    if depth <= 0 or not os.path.isdir(root):
        return found
    for name in sorted(os.listdir(root)):
        sub = os.path.join(root, name)
        if name.startswith(".") or ITER_RE.match(name) or not os.path.isdir(sub):
            continue
        if os.path.isfile(os.path.join(sub, TRACKER)) or complete_iterations(sub):
            found.append(sub)
        else:
            found += nested_checkpoints(sub, depth - 1)
    return found


def incomplete_saves(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.endswith(".tmp") and ITER_RE.match(n))


def recover_interrupted_saves(root: str) -> List[str]:
    """Rank 0 of the run that owns ``root`` (holds its lock): finish or undo interrupted re-saves,
    delete incomplete ``.tmp`` folders. Returns one line per action, for the log."""
    actions = []
    if not os.path.isdir(root):
        return actions
    for name in sorted(os.listdir(root)):
        if not (name.endswith(".old") and ITER_RE.fullmatch(name[:-4])):
            continue
        old = os.path.join(root, name)
        final = old[:-4]
        if not os.path.isdir(final):
            if os.path.isfile(os.path.join(final + ".tmp", integrity.MANIFEST)):
                os.replace(final + ".tmp", final)
                actions.append(f"completed the interrupted re-save of {final}")
            else:
                os.replace(old, final)
                actions.append(f"restored {final} from {name}")
                continue
        shutil.rmtree(old, ignore_errors=True)
    for name in incomplete_saves(root):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        actions.append(f"deleted the incomplete {os.path.join(root, name)}")
    _fsync_dir(root)
    return actions


# ---------------------------------------------------------------------------------- rng / state

def _rng_state() -> Dict[str, Any]:
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": device_policy.device_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    device_policy.set_device_rng_state(state.get("cuda"))
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _chunk_key(i: int) -> str:
    # Tensors are matched by their global sharded keys (layer numbers include the chunk's offset),
    # so a checkpoint loads into any pipeline layout; these dict keys only group the chunks.
    return "model" if i == 0 else f"model{i}"


def _sharded_state_dict(model, optimizer, is_loading: bool, with_optimizer: bool):
    state = {_chunk_key(i): chunk.sharded_state_dict(prefix=MODEL_PREFIX)
             for i, chunk in enumerate(_chunks(model))}
    if with_optimizer:
        model_sd = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd if len(model_sd) > 1 else model_sd["model"], is_loading=is_loading,
            metadata=OPTIMIZER_METADATA)
    return state


def _rank_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _errors() -> tuple:
    """What a failing dist_checkpointing call raises: torch's CheckpointException is a BaseException."""
    return (Exception, CheckpointException)


def _summary(exc: BaseException) -> str:
    """The underlying error(s), not the per-rank traceback dump of a CheckpointException."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        return "; ".join(f"{type(e).__name__}: {e}" for e in inner)[:400]
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def _gather(obj) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------- save

def _os_error(exc: Optional[BaseException], seen=None) -> Optional[OSError]:
    """The OSError under ``exc`` (its cause/context, or a rank's failure in DCP's CheckpointException)."""
    seen = seen or set()
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
        return exc
    failures = getattr(exc, "failures", None)
    nested = [f[0] if isinstance(f, tuple) else f for f in (failures.values() if isinstance(failures, dict) else [])]
    for inner in [exc.__cause__, exc.__context__, *nested]:
        found = _os_error(inner, seen)
        if found is not None:
            return found
    # megatron-core's shard writers report an OSError only as text: "Worker failure: [Errno 5] ..."
    m = _ERRNO_TEXT.search(str(exc))
    if m:
        return OSError(int(m.group(1)), m.group(2), m.group(3))
    return None


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?")


def _save_failed(error: Optional[BaseException], tmp: str) -> None:
    """Collective, after each step of a save: when any rank failed, rank 0 removes the partial
    ``tmp`` and every rank raises (one line naming the path; the failing rank's own error)."""
    rank, _ = _rank_world()
    if not any(_gather(error is not None)):
        return
    if rank == 0:  # a partial folder only takes space the user needs back
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointWriteError(errno.EIO, f"saving checkpoint {tmp} failed on another rank "
                                              "(see its error); the partial folder is removed")
    full = integrity.disk_full_error(error, tmp)
    if full is not None:
        raise full from error
    os_error = _os_error(error)
    if os_error is not None:
        where = f" ({os_error.filename})" if os_error.filename else ""
        raise CheckpointWriteError(
            os_error.errno, f"cannot write checkpoint {tmp}{where}: [Errno {os_error.errno}] "
                            f"{os.strerror(os_error.errno)}; the partial folder is removed") from error
    raise error


def _start_write(root: str, iteration: int, state: Dict[str, Any], with_rng: bool,
                 asynchronous: bool = False):
    """Collective: ``iter_N.tmp`` made, shards written (or, asynchronously, their AsyncRequest
    returned), RNG files written. Returns ``(tmp, request)``."""
    rank, _ = _rank_world()
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        recover_interrupted_saves(root)  # also removes a .tmp of this iteration
        os.makedirs(tmp)
    torch.distributed.barrier()
    error, request = None, None
    try:
        request = dist_checkpointing.save(state, tmp, async_sharded_save=asynchronous)
        if with_rng:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    except _errors() as e:
        error = e
    _save_failed(error, tmp)
    return tmp, request


def write_checkpoint(root: str, iteration: int, state: Dict[str, Any], with_rng: bool) -> str:
    """Collective: write ``state`` (a dist_checkpointing dict) as ``root/iter_N`` the safe way."""
    tmp, _ = _start_write(root, iteration, state, with_rng)
    return _complete(root, iteration, tmp)


def _complete(root: str, iteration: int, tmp: str) -> str:
    """Collective, once every shard of ``tmp`` is written: manifest last, then rank 0 publishes."""
    rank, _ = _rank_world()
    final = checkpoint_dir(root, iteration)
    torch.distributed.barrier()
    if rank == 0:
        _test_pause("write", iteration)
    files = {}
    for share in _gather(integrity.checksum_share(tmp, *_rank_world())):
        files.update(share)
    error = None
    if rank == 0:
        try:
            integrity.write_manifest(tmp, iteration, files)
        except OSError as e:
            error = e
    _save_failed(error, tmp)
    error = None
    if rank == 0:
        try:
            _publish(root, iteration)
        except OSError as e:
            error = e
    if any(_gather(error is not None)):  # the checkpoint is complete; only the tracker is behind
        if error is not None:
            raise error

        raise CheckpointWriteError(errno.EIO, f"rank 0 could not publish {final} (see its error)")
    return final


def _write_tracker(root: str, iteration: int) -> None:
    """Replace the tracker atomically; on failure remove its temporary file and name the tracker,
    and say that ``iter_N`` (already renamed in) is complete and how to load it."""
    tracker = os.path.join(root, TRACKER)
    tracker_tmp = tracker + ".tmp"
    try:
        previous = read_latest_iteration(root)
    except CheckpointError:
        previous = None
    try:
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, tracker)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tracker_tmp)
        kind = DiskFullError if e.errno in (errno.ENOSPC, errno.EDQUOT) else CheckpointWriteError
        names = f"still names {previous}" if previous is not None else "does not exist"
        full = "disk full: " if kind is DiskFullError else ""
        raise kind(e.errno, f"{full}cannot write the checkpoint tracker {tracker} ([Errno {e.errno}] "
                            f"{os.strerror(e.errno)}): {checkpoint_dir(root, iteration)} is complete"
                            f" but the tracker {names}; --ckpt-step {iteration} loads it") from None


def _publish(root: str, iteration: int) -> None:
    final = checkpoint_dir(root, iteration)
    _test_pause("written", iteration)
    if os.path.isdir(final):  # re-saving an iteration: keep the old one until the new is in place
        os.replace(final, final + ".old")
        _test_pause("old_moved", iteration)
    os.replace(final + ".tmp", final)
    _fsync_dir(root)
    _test_pause("renamed", iteration)
    _write_tracker(root, iteration)
    _fsync_dir(root)
    _test_pause("tracker", iteration)
    shutil.rmtree(final + ".old", ignore_errors=True)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler,
                    extra: Dict[str, Any], async_saver=None,
                    on_saved: Optional[Callable[[str, float], None]] = None) -> str:
    """Save on every rank (collective). ``model`` is the bare GPTModel of this stage, or the list
    of its model chunks (interleaved pipeline). With ``async_saver`` (megatron_let.training.
    async_save) the shards are written in the background and ``on_saved(path, seconds)`` runs once
    the checkpoint is complete and tracked (``seconds``: the finalisation's own time)."""
    state = _sharded_state_dict(model, optimizer, is_loading=False, with_optimizer=True)
    state["scheduler"] = scheduler.state_dict()
    state["extra"] = extra
    # where the distributed optimizer keeps each parameter: lets a run without it load this one
    state.update(conversion.layout_state(optimizer, _chunks(model)))
    if async_saver is not None:
        return async_saver.save(root, iteration, state, on_saved)
    return write_checkpoint(root, iteration, state, with_rng=True)


# ---------------------------------------------------------------------------------- load

def verify_checkpoint(path: str, root: str, iteration: int,
                      log: Callable[[str], None] = print) -> None:
    """Collective: check every file against the manifest (ranks share the files); CheckpointError
    naming the bad files and the newest complete older checkpoint."""
    rank, world = _rank_world()
    manifest = integrity.read_manifest(path)
    if manifest is None:
        log(f"{path} has no {integrity.MANIFEST} (written by an older megatron_let): not verified")
        return
    t0 = time.time()
    problems = [p for share in _gather(integrity.verify_share(path, manifest, rank, world)) for p in share]
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems[:5])
                              + f"; {older_hint(root, iteration)}")
    size = sum(f["size"] for f in manifest["files"].values())
    log(f"verified {len(manifest['files'])} files ({size / 2**20:.1f} MiB) of {path} in "
        f"{time.time() - t0:.2f}s")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "spiece.model",
                    "vocab.txt")


def _tokenizer_bytes(path: Optional[str]) -> Optional[Dict[str, bytes]]:
    """What defines a tokenizer's vocabulary, to compare two paths by content (a moved tokenizer
    folder is the same tokenizer); None when the path is gone."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {n: open(os.path.join(path, n), "rb").read() for n in _TOKENIZER_FILES
            if os.path.isfile(os.path.join(path, n))}


def compatibility_problems(saved: Dict[str, Any], model_cfg, tokenizer: Dict[str, Any],
                           check_seq_length: bool = True,
                           padded_vocab: Optional[int] = None) -> List[str]:
    """Differences between a checkpoint's recorded model/tokenizer and this run's, one per line."""
    # every LlamaConfig field but an explicit allow-list (training/compatibility.py)
    problems = model_problems(saved.get("model") or {}, model_cfg, check_seq_length)
    if padded_vocab is not None and padded_vocab_problem(saved, padded_vocab):
        problems.append(padded_vocab_problem(saved, padded_vocab))
    saved_tok = saved.get("tokenizer") or {}
    for key in ("type", "vocab_size"):
        if key in saved_tok and saved_tok[key] != tokenizer.get(key):
            problems.append(f"tokenizer {key}: checkpoint {saved_tok[key]}, this run {tokenizer.get(key)}")
    a, b = saved_tok.get("model"), tokenizer.get("model")
    if a and b and os.path.realpath(a) != os.path.realpath(b):
        ca, cb = _tokenizer_bytes(a), _tokenizer_bytes(b)
        if ca is not None and cb is not None and ca != cb:
            problems.append(f"--tokenizer-model: checkpoint {a}, this run {b} (different files)")
    return problems


EXTRA_STATE_SUFFIX = "_extra_state"


def load_model_state(module: torch.nn.Module, state: Dict[str, Any], path: str,
                     log: Callable[[str], None] = print) -> None:
    """``load_state_dict`` that is strict except for ``_extra_state`` keys the checkpoint lacks.

    A module's sharded state dict may leave out its extra state: Transformer Engine's core attention
    (megatron-core ``TEDotProductAttention.sharded_state_dict`` returns ``{}`` unless the softmax is
    learnable) still has one in its ``state_dict``, so a strict load would refuse every checkpoint
    written by the TE spec. Those modules keep their initial extra state (as Megatron-LM's fallback
    does); any other missing or unexpected key is a CheckpointError."""
    result = module.load_state_dict(state, strict=False)
    extra = [k for k in result.missing_keys if k.endswith(EXTRA_STATE_SUFFIX)]
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({', '.join(missing[:5])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected key(s) "
                         f"({', '.join(result.unexpected_keys[:5])})")
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    if extra:
        log(f"{path}: no {EXTRA_STATE_SUFFIX} for {len(extra)} module(s) whose sharded state dict "
            f"omits it (e.g. {extra[0]}); they keep their initial extra state")


def load_checkpoint(root: str, model, optimizer, scheduler, load_optim: bool = True,
                    load_rng: bool = True, ckpt_step: Optional[int] = None, verify: bool = True,
                    check: Optional[Callable[[Dict[str, Any], str], None]] = None,
                    log: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Load the checkpoint ``--load root`` (``--ckpt-step``) selects into model/optimizer/scheduler.

    Verifies it against its manifest first (``verify``), then calls ``check(extra, path)`` (the
    caller's compatibility test) before any tensor is read. Returns the saved ``extra`` dict with
    ``extra["_path"]`` set, or None when ``root`` has no complete checkpoint (a fresh start)."""
    found = find_checkpoint(root, ckpt_step)
    if found is None:
        return None
    iteration, path, why = found
    base = os.path.dirname(path) if ITER_RE.fullmatch(os.path.basename(path)) else root
    if why != TRACKER:
        log(f"loading {path} ({why})")
    if verify:
        verify_checkpoint(path, base, iteration, log)
    try:
        integrity.check_metadata_json(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {older_hint(base, iteration)}") from None
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except _errors() as e:
        raise CheckpointError(f"cannot read {os.path.join(path, 'common.pt')} ({_summary(e)}); "
                              f"{older_hint(base, iteration)}") from None
    extra = common.get("extra") if isinstance(common, dict) else None
    if check is not None and isinstance(extra, dict):
        check(extra, path)
    convert = None
    if load_optim:
        convert = check_optimizer_format(path, optimizer)
        # torch's AdamW creates its state lazily; materialise it so the sharded keys exist.
        optimizer.init_state_fn(optimizer.optimizer, optimizer.config) if hasattr(
            optimizer, "init_state_fn") and optimizer.init_state_fn else None
    # a layout conversion reads the optimizer state in a second pass, once the weights are in
    state = _sharded_state_dict(model, optimizer, is_loading=True,
                                with_optimizer=load_optim and convert is None)
    state["scheduler"] = None
    state["extra"] = None
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(state, path)
    except _errors() as e:
        raise CheckpointError(f"cannot read the shards of {path} (.metadata, __*.distcp; "
                              f"{_summary(e)}); {older_hint(base, iteration)}") from None
    # dist_checkpointing fills the tensors in place; load_state_dict also restores non-tensor
    # extra state and proves the checkpoint matches this architecture.
    for i, chunk in enumerate(_chunks(model)):
        load_model_state(chunk, {k[len(MODEL_PREFIX):]: v for k, v in loaded[_chunk_key(i)].items()},
                         path, log)
    if load_optim:
        with torch.no_grad():  # the distributed optimizer's fp32 shards are views of leaf params
            if convert == "to_regular":
                conversion.load_distributed_into_regular(path, optimizer, _chunks(model))
                log(f"converted the optimizer state of {path} from --use-distributed-optimizer's layout")
            elif convert == "to_distributed":
                conversion.load_regular_into_distributed(path, optimizer, _chunks(model), MODEL_PREFIX)
                log(f"converted the optimizer state of {path} to --use-distributed-optimizer's layout")
            else:
                optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = os.path.join(path, "rng", f"rank_{_rank_world()[0]:05d}.pt")
    if load_rng and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    extra = dict(loaded["extra"])
    extra["_path"] = path
    return extra
