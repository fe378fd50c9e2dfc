"""Evaluation of megatron_let students: perplexity / bits per byte and lm-eval downstream tasks.

* :mod:`megatron_let.evaluation.scoring` -- per-token log-probs from a TP/PP student.
* :mod:`megatron_let.evaluation.perplexity` -- ``evaluate_perplexity`` on indexed datasets.
* :mod:`megatron_let.evaluation.lm_eval_adapter` -- ``MegatronLetLM``, an lm-eval model (imports lm-eval).
* :mod:`megatron_let.evaluation.downstream` -- offline task YAMLs, ``evaluate_megatron``,
  ``evaluate_hf`` and the trainer hook ``run_downstream_eval``.

Submodules are imported on use (lm-eval is an optional, slow-to-import dependency).
"""

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada", "openbookqa", "piqa", "sciq",
               "winogrande", "boolq")
