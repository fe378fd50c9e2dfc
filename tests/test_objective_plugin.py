"""Adding an objective is adding one module: a new registered class trains with no loop changes."""

from dataclasses import dataclass

import pytest

from launch import TINY_MODEL
from megatron_let.objectives.base import Objective, masked_sum, metric, register, registry


@register
class ScaledNLL(Objective):
    """Toy objective for the test: L = c·L_NLL, reporting the NLL as a metric of its own."""

    name = "scaled_nll_for_test"
    metric_names = ("plain nll",)

    @dataclass
    class Config:
        scale: float = 3.0

    def output_loss(self, nll, logits, teacher_logits, loss_mask, step):
        total = masked_sum(nll, loss_mask)
        return self.config.scale * total, {"plain nll": metric(total, loss_mask.sum())}


def test_registered_objective_trains_without_loop_changes(megatron_single_process, tmp_path):
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.trainer import Trainer
    from launch import read_metrics

    assert "scaled_nll_for_test" in registry()
    metrics = str(tmp_path / "m.jsonl")
    cfg = parse_args(TINY_MODEL + ["--objective", "scaled_nll_for_test", "--mock-data",
                                   "--vocab-size", "200", "--micro-batch-size", "2",
                                   "--train-iters", "2", "--metrics-jsonl", metrics])
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    trainer.close()
    assert trainer.teacher.loaded is None  # the objective needs no teacher, none was loaded
    m = read_metrics(metrics)
    for i in (1, 2):
        assert m[i]["total loss"] == pytest.approx(3.0 * m[i]["lm loss"], rel=1e-6)
        assert m[i]["plain nll"] == pytest.approx(m[i]["lm loss"], rel=1e-6)
