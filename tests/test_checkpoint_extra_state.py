"""Loading checkpoints of models whose modules carry an ``_extra_state`` that their sharded state
dict leaves out, as Transformer Engine's core attention does (megatron-core
``TEDotProductAttention.sharded_state_dict`` returns ``{}`` for the default softmax) - issue 20 item 1.

A CPU stand-in: megatron-core's local core attention with get/set_extra_state and an empty sharded
state dict, put into the student's layer spec. Resume, tools/evaluate.py and tools/export_hf.py all
load through ``checkpointing.load_checkpoint`` (``checkpoint_io.load_student`` for the tools)."""

import dataclasses

import pytest
import torch

from megatron_let.model import llama

EXTRA = "decoder.layers.0.self_attention.core_attention._extra_state"


def _attention_with_extra_state(with_unsaved_param=False):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class ExtraStateAttention(DotProductAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = {"fp8_meta": 0}  # what TE keeps: metadata, not weights
            self.set_calls = 0
            if with_unsaved_param:
                self.unsaved = torch.nn.Parameter(torch.zeros(3))

        def get_extra_state(self):
            return self.extra

        def set_extra_state(self, state):
            self.extra = state
            self.set_calls += 1

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return {}  # as TEDotProductAttention: nothing of this module is saved

    return ExtraStateAttention


@pytest.fixture
def extra_state_spec(monkeypatch):
    """build_student builds the stand-in attention in every layer."""
    original = llama.build_layer_spec

    def install(**kw):
        attention = _attention_with_extra_state(**kw)

        def spec(config, use_te, vp_stage=None):
            block = original(config, use_te, vp_stage)
            layer = block.layer_specs[0]
            attn = layer.submodules.self_attention
            attn = dataclasses.replace(attn, submodules=dataclasses.replace(
                attn.submodules, core_attention=attention))
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(
                layer.submodules, self_attention=attn))
            return dataclasses.replace(block, layer_specs=[layer] * len(block.layer_specs))

        monkeypatch.setattr(llama, "build_layer_spec", spec)
    return install


CFG = llama.LlamaConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        vocab_size=128, seq_length=16)


def _save(root, seed):
    from megatron_let.export.checkpoint_io import save_model_checkpoint
    from megatron_let.runtime.device import ParallelConfig

    torch.manual_seed(seed)
    model = llama.build_student(CFG, ParallelConfig())
    assert EXTRA in model.state_dict() and "model." + EXTRA not in model.sharded_state_dict(
        prefix="model.")
    save_model_checkpoint(str(root), 1, model, {"model": dataclasses.asdict(CFG)})
    return model


def _same_weights(a, b):
    sa = {k: v for k, v in a.state_dict().items() if isinstance(v, torch.Tensor)}
    sb = {k: v for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_load_tolerates_omitted_extra_state(megatron_single_process, extra_state_spec,
                                                   tmp_path):
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.checkpointing import load_checkpoint

    extra_state_spec()
    saved = _save(tmp_path, seed=1)
    torch.manual_seed(2)
    model = llama.build_student(CFG, ParallelConfig())
    assert not torch.equal(model.embedding.word_embeddings.weight, saved.embedding.word_embeddings.weight)
    logged = []
    extra = load_checkpoint(str(tmp_path), model, None, None, load_optim=False, load_rng=False,
                            log=logged.append)
    assert extra is not None
    _same_weights(model, saved)  # every weight came from the checkpoint
    attn = model.decoder.layers[0].self_attention.core_attention
    assert attn.set_calls == 0 and attn.extra == {"fp8_meta": 0}  # kept its initial extra state
    note = [m for m in logged if "_extra_state" in m]
    assert len(note) == 1 and "2 module(s)" in note[0] and EXTRA in note[0], logged


def test_tools_load_path_tolerates_omitted_extra_state(megatron_single_process, extra_state_spec,
                                                       tmp_path, capsys):
    """evaluate.py and export_hf.py load through checkpoint_io.load_student."""
    from megatron_let.export.checkpoint_io import load_student
    from megatron_let.runtime.device import ParallelConfig

    extra_state_spec()
    saved = _save(tmp_path, seed=3)
    model, cfg, _ = load_student(str(tmp_path), ParallelConfig())
    _same_weights(model, saved)
    assert "_extra_state" in capsys.readouterr().out  # the tools say so


def test_other_missing_or_unexpected_keys_are_still_errors(megatron_single_process, extra_state_spec,
                                                           tmp_path):
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.checkpointing import load_checkpoint, load_model_state
    from megatron_let.training.errors import CheckpointError

    extra_state_spec(with_unsaved_param=True)  # a weight the checkpoint does not hold
    _save(tmp_path, seed=4)
    model = llama.build_student(CFG, ParallelConfig())
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\).*core_attention\.unsaved"):
        load_checkpoint(str(tmp_path), model, None, None, load_optim=False, load_rng=False,
                        log=lambda m: None)

    module = torch.nn.Linear(2, 2)
    state = dict(module.state_dict(), **{"stray.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \(stray\.weight\)"):
        load_model_state(module, state, "ckpt", log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \(bias\)"):
        load_model_state(module, {"weight": torch.zeros(2, 2)}, "ckpt", log=lambda m: None)
