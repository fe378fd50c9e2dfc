"""Worker for tests/test_gpu.py (needs a GPU): a fused layer spec against the plain local spec with
the same weights.

Usage: python te_spec_worker.py OUT_JSON [te|local]

``te`` (needs Transformer Engine): megatron's TE spec with the run's fusions (RoPE, bias-SwiGLU,
masked softmax, bias-dropout-add; model/spec.py) against the local spec with every fusion off.
``local``: the local spec with the fusions that need no TE/apex (jit-fused bias-SwiGLU and
bias-dropout-add) against the same spec unfused. Gradient-accumulation fusion stays off in both
(it accumulates into DDP's main_grad, which this worker does not build).

Builds the student twice on one GPU (fp32), copies the reference weights into the fused model (TE fuses each RMSNorm into the following linear layer:
``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight``
-> ``mlp.linear_fc1.layer_norm_weight``), hooks student layer k with the trainer's LayerCapture and
LET's hidden_loss, and runs forward + backward over several micro-batches with a zero language-model
loss, so the parameter gradients are the LET gradients alone. Writes the max relative differences of
the captured layer-k states and of every parameter gradient, how often each capture fired, and
whether layers above k stayed without gradient.
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_let.model.llama import LlamaConfig, build_student
from megatron_let.model.spec import ImplConfig, resolve_spec
from megatron_let.objectives.let import LETObjective
from megatron_let.runtime.device import ParallelConfig, initialize_distributed
from megatron_let.training.layer_capture import LayerCapture, find_local_layer

K = 2
MICRO_BATCHES = 3
# fp32, relative to the largest entry: TE's fused RMSNorm + GEMMs (TF32 may be on) vs the unfused
# local modules; the jit-fused elementwise kernels differ from eager only by rounding order
TOLERANCE = {"te": 1e-2, "local": 1e-4}
UNFUSED = dict(rope_fusion=False, bias_swiglu_fusion=False, masked_softmax_fusion=False,
               gradient_accumulation_fusion=False, bias_dropout_fusion=False)
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def te_name(local_name: str, mode: str = "te") -> str:
    if mode != "te":
        return local_name
    for old, new in TE_NAMES.items():
        if local_name.endswith(old):
            return local_name[: -len(old)] + new
    return local_name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def main() -> None:
    out_path = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "te"
    device = torch.device("cuda", 0)
    parallel = ParallelConfig()
    initialize_distributed(device, parallel, seed=3)
    cfg = LlamaConfig(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                      num_query_groups=4, vocab_size=512, seq_length=128, max_position_embeddings=128)
    plain = resolve_spec(ImplConfig(transformer_impl="local", **UNFUSED), "cuda")
    fused_spec = resolve_spec(ImplConfig(transformer_impl="transformer_engine" if mode == "te" else "local",
                                         gradient_accumulation_fusion=False), "cuda")
    local = build_student(cfg, parallel, bf16=False, use_cpu=False, spec=plain)
    te = build_student(cfg, parallel, bf16=False, use_cpu=False, spec=fused_spec)
    if not any(f.on for f in fused_spec.fusions):
        raise SystemExit(f"no fusion is on in {fused_spec.describe()}")

    te_params = dict(te.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, p in local.named_parameters():
            target = te_name(name, mode)
            if target not in te_params or te_params[target].shape != p.shape:
                raise SystemExit(f"no TE parameter for local {name} (looked for {target})")
            te_params[target].copy_(p)
            copied.add(target)
    missing = sorted(set(te_params) - copied)
    if missing:
        raise SystemExit(f"TE parameters without a local counterpart: {missing}")

    objective = LETObjective(LETObjective.Config(lambda0=1.0, stop_step=100, student_layer=K,
                                                 kernel="auto"), None)
    gen = torch.Generator().manual_seed(0)
    b, s, d_t = 2, cfg.seq_length, 96
    batches = [(torch.randint(0, cfg.vocab_size, (b, s), generator=gen).to(device),
                torch.randn(b, s, d_t, generator=gen).to(device),
                (torch.rand(b, s, generator=gen) > 0.2).float().to(device)) for _ in range(MICRO_BATCHES)]
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    results = {}
    for tag, model in (("local", local), ("te", te)):
        captured = []

        def loss_fn(h, t, m):
            captured.append(h.detach().float().clone())
            return objective.hidden_loss(h, t, m, step=0)

        capture = LayerCapture(find_local_layer(model, K), loss_fn, sequence_parallel=False)
        model.zero_grad(set_to_none=True)
        for tokens, teacher, mask in batches:
            capture.set_pending(teacher, mask)
            logits = model(tokens, position_ids, None)
            capture.clear()
            (logits.float().sum() * 0.0).backward()  # only the injected LET gradient is non-zero
        capture.remove()
        grads = {}
        for name, p in model.named_parameters():
            key = name if tag == "te" else te_name(name, mode)
            grads[key] = None if p.grad is None else p.grad.detach().float().clone()
        results[tag] = dict(captured=captured, grads=grads, fired=capture.fired)

    errors = {}
    for i, (a, b_) in enumerate(zip(results["te"]["captured"], results["local"]["captured"])):
        errors[f"captured_state_mb{i}"] = rel_err(a, b_)
    untouched_above_k = True
    for name, g_local in results["local"]["grads"].items():
        g_te = results["te"]["grads"][name]
        layer = int(name.split(".")[2]) + 1 if name.startswith("decoder.layers.") else None
        zero = lambda g: g is None or not g.any()  # noqa: E731
        if layer is not None and layer > K or name.startswith(("decoder.final_layernorm", "output_layer")):
            untouched_above_k &= zero(g_local) and zero(g_te)
            continue
        if zero(g_local):
            raise SystemExit(f"local spec: {name} got no LET gradient")
        errors[f"grad:{name}"] = rel_err(g_te, g_local)
    with open(out_path, "w") as f:
        json.dump({"errors": errors, "fired": {t: results[t]["fired"] for t in results},
                   "micro_batches": MICRO_BATCHES, "tolerance": TOLERANCE[mode],
                   "untouched_above_k": bool(untouched_above_k), "spec": fused_spec.describe(),
                   "fusions_on": [f.field for f in fused_spec.fusions if f.on]}, f, indent=1)


if __name__ == "__main__":
    main()
