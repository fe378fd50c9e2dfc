"""Hugging Face interop: megatron_let checkpoints <-> ``LlamaForCausalLM`` folders.

* :mod:`megatron_let.export.hf_conversion` -- config/state-dict conversion, HF folder and tokenizer IO.
* :mod:`megatron_let.export.checkpoint_io` -- read a checkpoint's ``extra``, load the student at any
  TP/PP, write model-only checkpoints.

Command-line tools: ``tools/export_hf.py`` and ``tools/import_hf.py`` (docs/evaluation.md).
"""

from megatron_let.export.hf_conversion import (  # noqa: F401
    hf_config_dict,
    hf_to_megatron,
    llama_config_from_hf,
    megatron_to_hf,
    shard_for_rank,
)
