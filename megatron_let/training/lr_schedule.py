"""The learning-rate / weight-decay schedule and what a resume does with the checkpoint's copy of it.

Megatron-LM's semantics (megatron-core's ``OptimizerParamScheduler``):

* ``--override-opt_param-scheduler``: the flags win; only the step count comes from the checkpoint;
* ``--use-checkpoint-opt_param-scheduler``: the checkpoint's schedule wins over the flags;
* neither: the flags must agree with the checkpoint; a disagreement is an error that names the flag
  and both values (megatron-core would raise a bare AssertionError here).

The step count always comes from the checkpoint. With ``--no-load-optim`` the scheduler is not loaded
at all (a fresh schedule from the flags), as in Megatron-LM.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# megatron-core's name of a scheduler field (OptimizerParamScheduler.load_state_dict) -> our flags
FLAG_OF_FIELD = {
    "learning rate": "--lr",
    "minimum learning rate": "--min-lr",
    "warmup iterations": "--lr-warmup-fraction/--lr-warmup-iters/--lr-warmup-samples",
    "total number of iterations": "--train-iters",  # or --lr-decay-iters/-samples when given
    "learning rate decay style": "--lr-decay-style",
    "start weight decay": "--weight-decay",
    "end weight decay": "--weight-decay",
    "total number of weight decay iterations": "--train-iters",
    "weight decay incr style": "weight decay increment style",
}


class LRScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler with a clear error for a flag that disagrees with the checkpoint, and
    an override that really overrides.

    megatron-core 0.16.1 reads each step's peak/floor from the optimizer's param groups
    (``param_group['max_lr']``/``['min_lr']``, set from the flags), and loading the optimizer state
    brings back the checkpoint's groups. With ``--override-opt_param-scheduler`` the flags' values are
    put back before the schedule is advanced to the checkpoint's step."""

    def __init__(self, optimizer, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self._flag_group_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        if self.override_opt_param_scheduler:
            for group, (max_lr, min_lr) in zip(self.optimizer.param_groups, self._flag_group_lrs):
                for key, value in (("max_lr", max_lr), ("min_lr", min_lr)):
                    if value is not None:
                        group[key] = value
        super().load_state_dict(state_dict)

    def _check_and_set(self, cls_value, sd_value, name):
        if (not self.override_opt_param_scheduler and not self.use_checkpoint_opt_param_scheduler
                and cls_value != sd_value):
            raise ValueError(
                f"{FLAG_OF_FIELD.get(name, name)} gives the {name} {cls_value!r} but the checkpoint "
                f"being resumed has {sd_value!r}: pass --override-opt_param-scheduler to use the "
                "flags' schedule or --use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )
        return super()._check_and_set(cls_value, sd_value, name)


def schedule_steps(optim_cfg, train_iters: int, global_batch_size: Optional[int] = None) -> dict:
    """Warmup, decay, WD-increment and WSD lengths in iterations (the scheduler steps once per
    iteration), from Megatron-LM's flags (its ``get_optimizer_param_scheduler``).

    Megatron-LM counts a sample-based schedule (``--train-samples``) in samples and steps it by the
    global batch; the same schedule in iterations is ``samples / global batch``, kept exact (a float
    when it does not divide), so the LR of every step is Megatron-LM's. Without samples the paper's
    default is kept: ``int(--lr-warmup-fraction x decay iterations)``."""
    s = optim_cfg.schedule
    iters = max(1, train_iters)
    if s.train_samples is not None:
        g = global_batch_size
        if not g:
            raise ValueError("a sample-based schedule (--train-samples) needs the global batch size")

        def per_batch(samples):
            return samples // g if samples % g == 0 else samples / g

        decay = per_batch(s.lr_decay_samples if s.lr_decay_samples is not None else s.train_samples)
        warmup = optim_cfg.lr_warmup_fraction * decay if optim_cfg.lr_warmup_fraction is not None \
            else per_batch(s.lr_warmup_samples or 0)
        wd_steps = per_batch(s.train_samples)
        wsd = per_batch(s.lr_wsd_decay_samples) if s.lr_wsd_decay_samples is not None else None
    else:
        decay = s.lr_decay_iters if s.lr_decay_iters is not None else iters
        warmup = int(optim_cfg.lr_warmup_fraction * decay) if optim_cfg.lr_warmup_fraction is not None \
            else (s.lr_warmup_iters or 0)
        wd_steps = iters
        wsd = s.lr_wsd_decay_iters
    if decay <= 0 or warmup >= decay:
        raise ValueError(f"the LR warmup ({warmup} iterations) must be shorter than its decay "
                         f"({decay} iterations): check --lr-warmup-*/--lr-decay-*")
    return dict(lr_warmup_steps=warmup, lr_decay_steps=decay, wd_incr_steps=max(wd_steps, 1),
                wsd_decay_steps=wsd)


def build_scheduler(optimizer, optim_cfg, train_iters: int,
                    global_batch_size: Optional[int] = None) -> LRScheduler:
    """The paper's schedule by default (linear warmup over a tenth of the run, then decay to
    min-lr), or the one Megatron-LM's schedule flags give (:func:`schedule_steps`)."""
    o = optim_cfg
    s = o.schedule
    wd = o.weight_decay
    return LRScheduler(
        optimizer, init_lr=s.lr_warmup_init, max_lr=o.lr, min_lr=o.resolved_min_lr(),
        lr_decay_style=o.lr_decay_style,
        start_wd=s.start_weight_decay if s.start_weight_decay is not None else wd,
        end_wd=s.end_weight_decay if s.end_weight_decay is not None else wd,
        wd_incr_style=s.weight_decay_incr_style, lr_wsd_decay_style=s.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler,
        **schedule_steps(o, train_iters, global_batch_size),
    )
