"""Tiny models built from configs, and the naive autograd oracle of docs/design.md."""

from __future__ import annotations

import torch

from domlora_kernels.lora_init import draw_lora_A, draw_lora_B, lora_scaling
from domlora_kernels.losses import causal_lm_losses

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


def naive_page(model, batches, names, *, rank, projection="A", estimator="fisher", seed=0, lora_alpha=None):
    """Oracle 1: one sample at a time, weights requiring grad, full G_b, float64 energies.

    Returns ``(scores {name: float}, per_sample {name: [N] float64})``.
    """
    s = lora_scaling(rank, lora_alpha)
    mods = dict(model.named_modules())
    per = {n: [] for n in names}
    sums = {n: {} for n in names}
    count = 0
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
                logits = model(input_ids=ids, use_cache=False).logits
                causal_lm_losses(logits, labels)[0].backward()
                count += 1
                for n in names:
                    mod = mods[n]
                    g = _weight_grad(mod).to(torch.float64)  # [m, n]
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
    finally:
        model.zero_grad(set_to_none=True)
        for p, rg in flags:
            p.requires_grad_(rg)
    per_t = {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}
    if estimator == "fisher":
        return {n: float(v.mean()) for n, v in per_t.items()}, per_t
    return {n: float(sum((x / count).square().sum() for x in sums[n].values())) for n in names}, per_t
