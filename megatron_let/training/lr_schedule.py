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

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# megatron-core's name of a scheduler field (OptimizerParamScheduler.load_state_dict) -> our flags
FLAG_OF_FIELD = {
    "learning rate": "--lr",
    "minimum learning rate": "--min-lr",
    "warmup iterations": "--lr-warmup-fraction x --train-iters",
    "total number of iterations": "--train-iters",
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


def build_scheduler(optimizer, optim_cfg, train_iters: int) -> LRScheduler:
    """The paper's schedule: linear warmup over a fraction of the run, then decay to min-lr."""
    o = optim_cfg
    iters = max(1, train_iters)
    return LRScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.resolved_min_lr(),
        lr_warmup_steps=int(o.lr_warmup_fraction * iters), lr_decay_steps=iters,
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler,
    )
