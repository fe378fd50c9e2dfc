"""Errors that stop a run with a clear message instead of a traceback (pretrain_let.py prints them)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, incomplete, corrupt or incompatible with this run."""


class DiskFullError(OSError):
    """A checkpoint save ran out of disk space (ENOSPC/EDQUOT, or torch's ``unexpected pos``)."""


class CheckpointWriteError(OSError):
    """A write of a checkpoint save (or of the ``--save`` lock) failed (EIO, EROFS, ...): names the file."""


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm became NaN/inf (``--check-for-nan-in-loss-and-grad``)."""


class SaveLockError(ValueError):
    """Another live run holds the ``--save`` directory."""


# raised during training (after set-up); pretrain_let.py turns them into one error line, exit 1
RUN_ERRORS = (CheckpointError, DiskFullError, CheckpointWriteError, NonFiniteError, SaveLockError)


def non_finite_error(iteration: int, non_finite, seen) -> NonFiniteError:
    """The stop report of ``--check-for-nan-in-loss-and-grad``: ``non_finite`` maps each metric
    that was NaN/inf to the ranks that saw it (MetricAccumulator.non_finite), ``seen`` the step's
    reduced values."""
    bad = "; ".join(f"{name} = {seen.get(name, float('nan'))} on rank{'s' if len(r) > 1 else ''} "
                    f"{','.join(map(str, r))}" for name, r in non_finite.items())
    return NonFiniteError(
        f"non-finite values at iteration {iteration}: {bad}. Nothing of this step was "
        "saved; lower --lr, check the data and the teacher, resume from the last checkpoint "
        "(--no-check-for-nan-in-loss-and-grad disables this check)")
