"""Tiny models and the oracles the probe is checked against (docs/design.md, "Oracles").

Importable by the tests, the benchmarks and the studies; nothing in the package's own code
path imports it. transformers and peft are imported inside the functions that build models.

- :func:`tiny_model`, :func:`tiny_moe`: 2-layer random-weight models of several families,
  built from configs (no download).
- :func:`naive_page`: oracle 1, naive autograd, one unpadded sample at a time in float64.
- :func:`peft_lora_energies`: oracle 2, peft's own ``lora_B.grad`` (or ``lora_A.grad``) per sample.
- :func:`naive_expert_energies`, :func:`peft_expert_energies`: the same two oracles for the
  expert weights of mixture-of-experts blocks.
"""

from __future__ import annotations

import torch

from .lora_init import draw_lora_A, draw_lora_B, lora_scaling
from .probe.experts import draw_expert_A, draw_expert_B, find_expert_weights
from .probe.losses import causal_lm_losses

# Every (projection, estimator) pair page_scores accepts; ("expected", "gradient") is refused.
COMBOS = [(p, e) for p in ("A", "B", "AB", "expected") for e in ("fisher", "gradient") if (p, e) != ("expected", "gradient")]

# The dtypes the Triton kernels take; the torch reference also takes float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref`` (in float64)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def uses_gram(t: int, m: int, n: int) -> bool:
    """The tests' own statement of the ops' cost rule: the Gram form ``||X X^T . D D^T||``
    costs ``t^2 (m + n)`` against ``t m n`` for the direct ``||D^T X||^2``."""
    return t * t * (m + n) < t * m * n


def rel_err_dict(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]) ** 2 for k in b) ** 0.5
    den = sum(b[k] ** 2 for k in b) ** 0.5
    return num / den


VOCAB = 101


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of the family ``arch`` with random weights (eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=96, num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=96, num_key_value_heads=2, **common))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=4, **common)
        )
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def sample_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token batch with the given row lengths."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _weight_grad(module: torch.nn.Module) -> torch.Tensor:
    g = module.weight.grad
    return g.T if type(module).__name__ == "Conv1D" else g  # Conv1D stores [in, out]


def _sample_weight_grads(model, batches, names):
    """Each unpadded sample's full weight gradients ``{name: G_b [m, n]}`` in float64, one sample per
    forward and backward with every weight requiring grad; the flags are restored at the end."""
    mods = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        for batch in batches:
            for b in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][b].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
                ids = batch["input_ids"][b : b + 1, :length]
                labels = batch["labels"][b : b + 1, :length] if "labels" in batch else ids
                model.zero_grad(set_to_none=True)
                causal_lm_losses(model(input_ids=ids, use_cache=False).logits, labels)[0].backward()
                yield {n: _weight_grad(mods[n]).to(torch.float64) for n in names}
    finally:
        model.zero_grad(set_to_none=True)
        for p, rg in flags:
            p.requires_grad_(rg)


def naive_page(model, batches, names, *, rank, projection="A", estimator="fisher", seed=0, lora_alpha=None):
    """Oracle 1: one sample at a time, weights requiring grad, full G_b, float64 energies.

    Returns ``(scores {name: float}, per_sample {name: [N] float64})``.
    """
    s = lora_scaling(rank, lora_alpha)
    per = {n: [] for n in names}
    sums = {n: {} for n in names}
    count = 0
    for grads in _sample_weight_grads(model, batches, names):
        count += 1
        for n, g in grads.items():  # g: [m, n]
            a = draw_lora_A(n, rank, g.shape[1], seed).to(torch.float64)
            bm = draw_lora_B(n, rank, g.shape[0], seed).to(torch.float64)
            e = 0.0
            if projection in ("A", "AB"):
                e += float((s * g @ a.T).square().sum())
            if projection in ("B", "AB"):
                e += float((s * bm.T @ g).square().sum())
            if projection == "expected":
                e += float(s * s * rank / (3 * g.shape[1]) * g.square().sum())
            per[n].append(e)
            if estimator == "gradient":
                acc = sums[n]
                if projection in ("A", "AB"):
                    acc["A"] = acc.get("A", 0) + s * g @ a.T
                if projection in ("B", "AB"):
                    acc["B"] = acc.get("B", 0) + s * bm.T @ g
    per_t = {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}
    if estimator == "fisher":
        return {n: float(v.mean()) for n, v in per_t.items()}, per_t
    return {n: float(sum((x / count).square().sum() for x in sums[n].values())) for n in names}, per_t


def naive_mean_gradient(model, batches, names, *, rank, seed=0, lora_alpha=None) -> dict[str, torch.Tensor]:
    """Oracle 1 for the mean projected gradient: ``s (1/N) sum_b G_b A^T`` ``[m, r]`` per module,
    from each unpadded sample's full weight gradient ``G_b``, in float64."""
    s = lora_scaling(rank, lora_alpha)
    acc = {n: 0.0 for n in names}
    count = 0
    for grads in _sample_weight_grads(model, batches, names):
        count += 1
        for n, g in grads.items():
            acc[n] = acc[n] + s * g @ draw_lora_A(n, rank, g.shape[1], seed).to(torch.float64).T
    return {n: v / count for n, v in acc.items()}


def peft_lora_energies(model, batches, scores, projection, rank, alpha):
    """Oracle 2: per-sample squared norm of the gradient of the trainable LoRA factor in peft."""
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(scores.scores),
                     fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, cfg)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(layers) == set(scores.scores)
    with torch.no_grad():
        for name, layer in layers.items():
            if projection == "A":  # peft's default init: B = 0, A = the probe's A
                layer.lora_A["default"].weight.copy_(scores.lora_A[name])
            else:  # nonzero B with A = 0 keeps the forward unchanged; then dL/dA = s B^T G
                layer.lora_A["default"].weight.zero_()
                layer.lora_B["default"].weight.copy_(scores.lora_B[name])
    per = {n: [] for n in layers}
    peft_model.eval()
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b : b + 1, :length]
            labels = batch["labels"][b : b + 1, :length] if "labels" in batch else ids
            peft_model.zero_grad(set_to_none=True)
            causal_lm_losses(peft_model(input_ids=ids, use_cache=False).logits, labels)[0].backward()
            for name, layer in layers.items():
                factor = layer.lora_B if projection == "A" else layer.lora_A
                per[name].append(float(factor["default"].weight.grad.double().square().sum()))
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}


# ---------------------------------------------------------------- mixture of experts
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


def _moe_rows(batches):
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
        for ids in _moe_rows(batches):
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
        for ids in _moe_rows(batches):
            peft_model.zero_grad(set_to_none=True)
            causal_lm_losses(peft_model(input_ids=ids, use_cache=False).logits, ids)[0].backward()
            for name, layer in layers.items():
                g = layer.lora_B["default"].weight.grad.double()  # [out, r*E]
                num_experts = weights[name].num_experts
                per[name].append(torch.stack([g[:, e::num_experts].square().sum() for e in range(num_experts)]))
    finally:
        peft_model.unload()
    return {n: torch.stack(v) for n, v in per.items()}
