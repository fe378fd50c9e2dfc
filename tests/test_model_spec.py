"""--transformer-impl and the fusions (model/spec.py), issue 20 items 2 and 3.

The CUDA-only decisions are tested on CPU with CUDA, Transformer Engine and apex availability
mocked (``runtime.device.cuda_usable`` / ``spec.te_importable`` / ``spec.module_importable``),
asserting the TransformerConfig fields megatron-core receives. The local attention's s x s memory formula is
checked against the tensors megatron-core's local attention actually saves for backward."""

import pytest
import torch

from launch import TINY_MODEL, run_pretrain
from megatron_let.model import spec as model_spec
from megatron_let.model.llama import LlamaConfig, build_transformer_config
from megatron_let.runtime import device as device_policy
from megatron_let.runtime.device import ParallelConfig

FIELDS = ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
          "gradient_accumulation_fusion", "bias_dropout_fusion")
SWITCH = {"apply_rope_fusion": "--no-rope-fusion", "bias_activation_fusion": "--no-bias-swiglu-fusion",
          "masked_softmax_fusion": "--no-masked-softmax-fusion",
          "gradient_accumulation_fusion": "--no-gradient-accumulation-fusion",
          "bias_dropout_fusion": "--no-bias-dropout-fusion"}
CFG = LlamaConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  vocab_size=128, seq_length=16)
RUN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
       "--vocab-size", "128", "--mock-data", "--objective", "baseline", "--train-iters", "1"]


@pytest.fixture
def gpu_node(monkeypatch):
    """A CUDA machine, as far as the decisions can tell: ``te``/``apex`` say what imports."""
    def install(te=True, apex=True):
        monkeypatch.setattr(device_policy, "cuda_usable", lambda: True)
        monkeypatch.setattr(model_spec, "te_importable", lambda: te)
        monkeypatch.setattr(model_spec, "module_importable", lambda name: apex)
        # TransformerConfig checks that megatron-core found TE's fused RoPE at import
        from megatron.core.models.common.embeddings import rope_utils

        monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    return install


def _tconfig(spec, use_cpu):
    return build_transformer_config(CFG, ParallelConfig(), bf16=False, use_cpu=use_cpu, spec=spec)


def _impl(argv):
    from megatron_let.training.arguments import parse_args

    return parse_args(["--dry-run", *RUN, *argv]).impl


def test_cpu_keeps_every_fusion_off_and_no_p2p_sync():
    spec = model_spec.resolve_spec(_impl([]), "cpu")
    assert spec.impl == "local" and not spec.use_te
    tc = _tconfig(spec, use_cpu=True)
    assert not any(getattr(tc, f) for f in FIELDS) and tc.batch_p2p_sync is False
    with pytest.raises(ValueError, match="needs a CUDA device.*--transformer-impl local"):
        model_spec.resolve_spec(_impl(["--transformer-impl", "transformer_engine"]), "cpu")


def test_gpu_with_te_and_apex_turns_every_fusion_on(gpu_node):
    gpu_node(te=True, apex=True)
    spec = model_spec.resolve_spec(_impl([]), "cuda")
    assert spec.impl == "transformer_engine" and spec.use_te
    tc = _tconfig(spec, use_cpu=False)
    assert all(getattr(tc, f) for f in FIELDS), {f: getattr(tc, f) for f in FIELDS}
    assert tc.batch_p2p_sync is False  # megatron-core's default (True) synchronises the device


@pytest.mark.parametrize("field", FIELDS)
def test_each_megatron_switch_turns_its_fusion_off(gpu_node, field):
    gpu_node(te=True, apex=True)
    tc = _tconfig(model_spec.resolve_spec(_impl([SWITCH[field]]), "cuda"), use_cpu=False)
    assert getattr(tc, field) is False
    assert all(getattr(tc, f) for f in FIELDS if f != field)


def test_fusions_follow_their_kernels(gpu_node):
    gpu_node(te=True, apex=False)  # TE but no apex (the GPU image of the check)
    te = model_spec.resolve_spec(_impl([]), "cuda")
    assert te.fusion("gradient_accumulation_fusion").on is False
    assert "fused_weight_gradient_mlp_cuda" in te.fusion("gradient_accumulation_fusion").why
    assert te.fusion("masked_softmax_fusion").on and te.fusion("apply_rope_fusion").on
    local = model_spec.resolve_spec(_impl(["--transformer-impl", "local"]), "cuda")
    assert not local.fusion("masked_softmax_fusion").on  # the local attention needs apex's kernel
    assert local.fusion("bias_activation_fusion").on and local.fusion("bias_dropout_fusion").on

    gpu_node(te=False, apex=False)  # --transformer-impl local on a GPU without TE
    local = model_spec.resolve_spec(_impl(["--transformer-impl", "local"]), "cuda")
    assert not local.fusion("apply_rope_fusion").on and "Transformer Engine" in local.fusion(
        "apply_rope_fusion").why
    tc = _tconfig(local, use_cpu=False)
    assert (tc.apply_rope_fusion, tc.bias_activation_fusion, tc.gradient_accumulation_fusion) == (
        False, True, False)


def test_cuda_without_te_is_an_error_before_any_compute(gpu_node, monkeypatch):
    """The default on CUDA is TE: without it the run stops in the preflight, naming the fix, before
    the process group or the model exist - and the dry run says the same."""
    from megatron_let.runtime import device as dev
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.dry_run import plan_run
    from megatron_let.training.trainer import Trainer

    gpu_node(te=False)
    monkeypatch.setattr(dev, "cuda_device_count", lambda: 1)

    def no_compute(*a, **k):
        raise AssertionError("initialize_distributed ran before the TE check")

    monkeypatch.setattr(dev, "initialize_distributed", no_compute)
    trainer = Trainer(parse_args(RUN))
    with pytest.raises(ValueError) as err:
        trainer.setup()
    msg = str(err.value)
    assert "transformer-engine[pytorch]" in msg and "--transformer-impl local" in msg
    with pytest.raises(ValueError, match=r"transformer-engine\[pytorch\].*--transformer-impl local"):
        plan_run(parse_args(["--dry-run", *RUN, "--device", "cuda"]))


def test_local_attention_bytes_are_what_megatron_saves(megatron_single_process):
    """kept = the s x s tensors megatron-core's local DotProductAttention saves for backward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    b, heads, s, d = 2, 4, 64, 16
    for bf16 in (False, True):
        dt = torch.bfloat16 if bf16 else torch.float32
        tc = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, bf16=bf16,
                               params_dtype=dt, use_cpu_initialization=True, attention_dropout=0.0,
                               hidden_dropout=0.0)
        attn = DotProductAttention(tc, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                   attention_type="self")
        q, k, v = (torch.randn(s, b, heads, d, dtype=dt, requires_grad=True) for _ in range(3))
        saved = {}

        def pack(t):
            if t.numel() == b * heads * s * s:  # the s x s tensors, not q/k/v
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        kept, transient = model_spec.local_attention_bytes(b, heads, 1, s, bf16)
        assert sum(saved.values()) == kept, (bf16, saved)
        assert transient > 0


def _plan(argv):
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.dry_run import format_plan, plan_run

    plan = plan_run(parse_args(["--dry-run", *argv]))
    return plan, format_plan(plan)


def test_dry_run_counts_the_local_attention_and_warns_when_it_does_not_fit(gpu_node, monkeypatch):
    from megatron_let.training import dry_run

    gpu_node(te=True, apex=False)
    monkeypatch.setattr(dry_run, "device_memory_bytes", lambda: 141 * 2**30)  # one H200
    paper = ["--model-preset", "llama-1b", "--seq-length", "1280", "--micro-batch-size", "16",
             "--vocab-size", "49152", "--bf16", "--objective", "baseline"]
    te, te_text = _plan(paper)
    local, local_text = _plan(paper + ["--transformer-impl", "local"])
    n = 16 * 32 * 1280 ** 2  # b x heads x s^2 per layer (TP 1)
    kept, transient = 6 * n, 10 * n  # bf16: fp32 softmax + its bf16 copy; scores, fp32 copies
    assert local.attention_bytes == kept and te.attention_bytes == 0
    assert local.memory[0].activations - te.memory[0].activations == pytest.approx(24 * kept + transient)
    assert "does not fit this GPU's 141.00 GiB" in local_text and "s x s" in local_text
    assert "does not fit" not in te_text
    for text, backend in ((te_text, "Transformer Engine DotProductAttention"),
                          (local_text, "megatron-core local DotProductAttention")):
        assert f"attention backend: {backend}" in text
        assert all(f"{f}: " in text for f in FIELDS) and "batch_p2p_sync: off" in text
    # selective recompute recomputes core attention: only the live layer's s x s remains
    sel, _ = _plan(paper + ["--transformer-impl", "local", "--recompute-granularity", "selective"])
    te_sel, _ = _plan(paper + ["--recompute-granularity", "selective"])
    assert sel.memory[0].activations - te_sel.memory[0].activations == pytest.approx(kept + transient)


def test_run_log_states_spec_backend_and_fusions(tmp_path):
    out = run_pretrain(TINY_MODEL + ["--mock-data", "--vocab-size", "128", "--objective", "baseline",
                                     "--train-iters", "1"], timeout=300).stdout
    assert "student spec: --transformer-impl local on cpu" in out
    assert "attention backend: megatron-core local DotProductAttention" in out
    for field in FIELDS:
        assert f"{field}: off" in out
    assert "batch_p2p_sync: off" in out


def test_jit_fusions_compute_what_the_unfused_layers_do(megatron_single_process):
    """The fusions the GPU default turns on without TE/apex (megatron-core's torch.compile-fused
    bias-SwiGLU and bias-dropout-add; the student has no biases) run here on CPU too once asked for:
    same loss and gradients as the unfused student with the same weights."""
    from megatron_let.model.llama import build_student

    plain = model_spec.resolve_spec(model_spec.ImplConfig(), "cpu")
    wanted = ("bias_activation_fusion", "bias_dropout_fusion")
    fused = model_spec.StudentSpec("local", "cpu", [
        model_spec.Fusion(f.field, f.flag, f.what, f.field in wanted, "test") for f in plain.fusions])
    torch.manual_seed(0)
    ref = build_student(CFG, ParallelConfig(), spec=plain)
    got = build_student(CFG, ParallelConfig(), spec=fused)
    got.load_state_dict(ref.state_dict())
    assert (got.config.bias_activation_fusion, got.config.bias_dropout_fusion) == (True, True)
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 128, (2, 16), generator=g) for _ in range(2))
    pos = torch.arange(16).expand(2, -1)
    losses = []
    for model in (ref, got):
        loss = model(tokens, pos, None, labels=labels).sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        assert float((p.grad - q.grad).abs().max()) <= 1e-6 * float(p.grad.abs().max()) + 1e-9, name
