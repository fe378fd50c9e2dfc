"""The megatron-core LLaMA student equals an independent plain-PyTorch LLaMA with the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_let.model.llama import LlamaConfig, build_student, preset
from megatron_let.runtime.device import ParallelConfig


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, base, rot_dim=None):
    """Rotate-half RoPE (GPT-NeoX / HF Llama) on the first ``rot_dim`` dims of each head (all by
    default); the rest passes unrotated (Megatron's --rotary-percent). x: [b, heads, s, d]."""
    s, d = x.shape[-2], x.shape[-1]
    rot_dim = rot_dim or d
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    r, rest = x[..., :rot_dim], x[..., rot_dim:]
    r1, r2 = r[..., : rot_dim // 2], r[..., rot_dim // 2:]
    return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)


def reference_llama(sd, cfg: LlamaConfig, ids):
    """Plain LLaMA forward from megatron-core's state-dict layout, written from the architecture:
    head dim ``kv_channels`` (default hidden / heads), RoPE on ``rotary_percent`` of each head,
    norm scale 1 + w with ``apply_layernorm_1p``."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    ng = cfg.num_query_groups or nh
    hd = cfg.kv_channels or h // nh
    rot = int(hd * cfg.rotary_percent)
    g = (lambda w: w + 1.0) if cfg.apply_layernorm_1p else (lambda w: w)
    b, s = ids.shape
    x = sd["embedding.word_embeddings.weight"][ids]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        a = rms_norm(x, g(sd[p + "input_layernorm.weight"]), cfg.norm_epsilon)
        # fused qkv rows are grouped: per KV group, [q heads of the group, k, v]
        w = sd[p + "self_attention.linear_qkv.weight"].view(ng, (nh // ng + 2) * hd, h)
        wq = w[:, : nh // ng * hd].reshape(nh * hd, h)
        wk = w[:, nh // ng * hd: nh // ng * hd + hd].reshape(ng * hd, h)
        wv = w[:, nh // ng * hd + hd:].reshape(ng * hd, h)
        q = (a @ wq.T).view(b, s, nh, hd).transpose(1, 2)
        k = (a @ wk.T).view(b, s, ng, hd).transpose(1, 2)
        v = (a @ wv.T).view(b, s, ng, hd).transpose(1, 2)
        q, k = rope(q, cfg.rotary_base, rot), rope(k, cfg.rotary_base, rot)
        k = k.repeat_interleave(nh // ng, dim=1)
        v = v.repeat_interleave(nh // ng, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * hd)
        x = x + o @ sd[p + "self_attention.linear_proj.weight"].T
        m = rms_norm(x, g(sd[p + "pre_mlp_layernorm.weight"]), cfg.norm_epsilon)
        gate, up = (m @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = rms_norm(x, g(sd["decoder.final_layernorm.weight"]), cfg.norm_epsilon)
    out_w = sd.get("output_layer.weight", sd["embedding.word_embeddings.weight"])
    return x @ out_w.T


@pytest.mark.parametrize("tied,groups", [(False, 2), (True, None)])
def test_student_matches_plain_pytorch_llama(megatron_single_process, tied, groups):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=groups, seq_length=12, vocab_size=100,
                      untie_embeddings_and_output_weights=not tied, rotary_base=500)
    model = build_student(cfg, ParallelConfig())
    with torch.no_grad():  # non-trivial norm weights so a missing norm would show
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    ids = torch.randint(0, 100, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    logits = model(ids, pos, None)

    sd = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()
          if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    ref = reference_llama(sd, cfg, ids)
    padded = cfg.padded_vocab_size()
    assert logits.shape == (2, 12, padded)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)

    # backward: same gradients for every parameter
    target = torch.randn_like(ref)
    (logits * target).sum().backward()
    (ref * target).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_presets_and_validation():
    c = preset("llama-1b", vocab_size=49152)
    assert (c.hidden_size, c.ffn_hidden_size, c.num_layers, c.num_attention_heads) == (2048, 5461, 24, 32)
    c7 = preset("llama-7b", vocab_size=32000)
    assert (c7.hidden_size, c7.ffn_hidden_size, c7.num_layers) == (4096, 11008, 32)
    # 7B LLaMA has ~6.7B parameters with a 32k vocabulary (untied)
    assert 6.5e9 < c7.num_parameters() < 6.9e9
    with pytest.raises(ValueError, match="not divisible by --tensor-model-parallel-size"):
        LlamaConfig(num_attention_heads=6, hidden_size=96).validate(tensor_parallel_size=4)
    with pytest.raises(ValueError, match="--num-layers 5 is not divisible"):
        LlamaConfig(num_layers=5).validate(pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="unknown --model-preset"):
        preset("llama-70b")
