"""Tiny mixture-of-experts models built from configs, and the expert oracles of issue 14.

Oracle 1, naive autograd: one unpadded sample at a time, every weight requiring grad, the
full ``[E, out, in]`` gradient, then per expert ``||dL/dW_e||^2`` and ``||dL/dW_e A_e^T||^2``
in float64. Oracle 2, peft: ``LoraConfig(target_parameters=...)`` with the probe's A copied
into ``lora_A``; the per-expert blocks of ``lora_B.grad`` (columns ``e::E``).
"""

from __future__ import annotations

import torch

from domlora_kernels.experts import draw_expert_A, draw_expert_B, find_expert_weights
from domlora_kernels.lora_init import lora_scaling
from domlora_kernels.losses import causal_lm_losses

VOCAB = 101
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]


def tiny_moe(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, experts_implementation: str | None = None):
    """A 2-layer MoE model of the family ``arch`` (4 experts, top-2), random weights, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
    elif arch == "qwen2_moe":  # a shared expert (nn.Linear) and its sigmoid gate next to the routed ones
        cfg = tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                num_experts=4, num_experts_per_tok=2, **common)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                head_dim=8, **common)
    elif arch == "gpt_oss":  # weights stored [E, in, out], interleaved gate/up, biases
        cfg = tf.GptOssConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                              layer_types=["sliding_attention", "full_attention"], sliding_window=8, **common)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    if arch == "gpt_oss":  # from_config leaves the expert biases at zero; make them count
        with torch.no_grad():
            for w in find_expert_weights(model):
                getattr(w.module, f"{w.parameter}_bias").normal_(0, 0.02)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model.to(dtype).eval()


def _rows(batches):
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][b].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
            yield batch["input_ids"][b:b + 1, :length]


def _expert_grad(weight, transposed: bool) -> torch.Tensor:
    g = weight.grad.to(torch.float64)
    return g.transpose(1, 2) if transposed else g  # [E, out, in]


def naive_expert_energies(model, batches, *, rank: int, seed: int = 0, lora_alpha=None) -> dict:
    """Per expert weight ``name -> {"A": [N, E], "B": [N, E], "full": [N, E], "A_mean": [E], "B_mean": [E]}``.

    "A": ``||s G_e A_e^T||^2``; "B": ``||s B_e^T G_e||^2``; "full": ``||G_e||^2`` for each sample;
    "A_mean" / "B_mean": the squared norm of the mean over samples of ``s G_e A_e^T`` /
    ``s B_e^T G_e`` (estimator "gradient"). All float64.
    """
    s = lora_scaling(rank, lora_alpha)
    weights = find_expert_weights(model)
    out = {w.name: {"A": [], "B": [], "full": [], "A_sum": [], "B_sum": []} for w in weights}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        for ids in _rows(batches):
            model.zero_grad(set_to_none=True)
            causal_lm_losses(model(input_ids=ids, use_cache=False).logits, ids)[0].backward()
            for w in weights:
                g = _expert_grad(getattr(w.module, w.parameter), w.module.is_transposed)
                a = draw_expert_A(w.name, rank, w.num_experts, w.in_features, seed).double()
                b = draw_expert_B(w.name, rank, w.num_experts, w.out_features, seed).double()
                out[w.name]["A"].append((s * g @ a.transpose(1, 2)).square().sum(dim=(1, 2)))
                out[w.name]["B"].append((s * b.transpose(1, 2) @ g).square().sum(dim=(1, 2)))
                out[w.name]["full"].append(g.square().sum(dim=(1, 2)))
                out[w.name]["A_sum"].append(s * g @ a.transpose(1, 2))
                out[w.name]["B_sum"].append(s * b.transpose(1, 2) @ g)
    finally:
        model.zero_grad(set_to_none=True)
        for p, rg in flags:
            p.requires_grad_(rg)
    res = {n: {k: torch.stack(v) for k, v in d.items()} for n, d in out.items()}
    for d in res.values():
        for key in ("A", "B"):
            d[f"{key}_mean"] = d.pop(f"{key}_sum").mean(dim=0).square().sum(dim=(1, 2))
    return res


def peft_expert_energies(model, batches, *, rank: int, lora_alpha: float, seed: int = 0) -> dict:
    """``name -> [N, E]``: per sample, per expert ``||lora_B.grad[:, e::E]||^2`` of peft's
    ``target_parameters`` LoRA on every expert weight, ``lora_A`` set to the probe's A."""
    from peft import LoraConfig, get_peft_model

    weights = {w.name: w for w in find_expert_weights(model)}
    suffixes = sorted({f"experts.{w.parameter}" for w in weights.values()})
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=[], target_parameters=suffixes)
    peft_model = get_peft_model(model, cfg)
    layers = {}
    for name, mod in peft_model.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            layers[f"{owner}.{mod.parameter_name}"] = mod
    assert set(layers) == set(weights), (sorted(layers), sorted(weights))
    with torch.no_grad():
        for name, layer in layers.items():
            w = weights[name]
            a = draw_expert_A(name, rank, w.num_experts, w.in_features, seed).reshape(-1, w.in_features)
            layer.lora_A["default"].weight.copy_(a)
    per = {n: [] for n in layers}
    try:
        for ids in _rows(batches):
            peft_model.zero_grad(set_to_none=True)
            causal_lm_losses(peft_model(input_ids=ids, use_cache=False).logits, ids)[0].backward()
            for name, layer in layers.items():
                g = layer.lora_B["default"].weight.grad.double()  # [out, r*E]
                num_experts = weights[name].num_experts
                per[name].append(torch.stack([g[:, e::num_experts].square().sum() for e in range(num_experts)]))
    finally:
        peft_model.unload()
    return {n: torch.stack(v) for n, v in per.items()}
