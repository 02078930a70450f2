"""From the probe into training: probe, place LoRA within a parameter budget, fine-tune with the
Hugging Face Trainer, save the adapter, reload it with PeftModel.from_pretrained, and generate.

1. Probe the model on a few samples of the shipped calibration set, measuring what the
   package's default placement strategy needs (measure_signals: one probe, gradient estimator).
2. Place adapters with a budget (default 1% of vanilla LoRA's parameters on all linear
   modules at rank 8): apply_domlora's default strategy picks the modules and their ranks
   (PLoP's v/o/down types where the budget buys them on every layer, whole module types by
   Adam's first-step gain below), lora_A = the probe's A.
3. Fine-tune them with transformers' Trainer on a small generated task (sums answered in one
   fixed format, loss on the assistant's tokens only), printing the held-out loss before and
   after training.
4. Save the adapter, load the base model again, reload the adapter with
   PeftModel.from_pretrained, check that it gives the trained model's logits, and generate.

With --load-in-4bit the base is bitsandbytes NF4 and this is the QLoRA path: apply_domlora
prepares the 4-bit model for k-bit training as peft recommends; nothing else changes.

Run from the repository root (defaults sized for a CPU: SmolLM2-135M-Instruct, 30 steps):
    python -m python.examples.finetune
    python -m python.examples.finetune --load-in-4bit --steps 10
"""

from __future__ import annotations

import argparse
import random
import warnings
from pathlib import Path

import torch

from domlora_kernels import apply_domlora, measure_signals, parse_budget
from domlora_kernels.data import collate, encode, has_chat_template, load_calibration, make_batches
from domlora_kernels.models import load_model

RANK, ALPHA = 8, 16  # the probe measures at the adapter's own scaling alpha / r


def sums_task(n: int, seed: int) -> list[dict]:
    """``n`` chat records: "What is a + b?" answered as "a + b = c." (the format is what is learnt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                 {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    return out


def prompt_ids(tok, question: str) -> torch.Tensor:
    """The generation prompt of one user turn: the chat template, or data.py's plain rendering."""
    if has_chat_template(tok):
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = [] if tok.bos_token_id is None else [tok.bos_token_id]
    for piece in ("User: ", f"{question}\n", "Assistant: "):  # tokenised piece by piece, as data.py renders them
        ids += tok(piece, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def generate(model, tok, question: str, max_new_tokens: int) -> str:
    ids = prompt_ids(tok, question).to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _trainer(model, tok, train, held_out, args: argparse.Namespace):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(args.out_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    encoded = [[encode(r, tok, args.max_length, where=f"record {i}") for i, r in enumerate(rs)] for rs in (train, held_out)]
    return Trainer(model=model, args=targs, train_dataset=encoded[0], eval_dataset=encoded[1],
                   data_collator=lambda feats: collate(feats, tok.pad_token_id))


def load(args: argparse.Namespace):
    return load_model(args.model, dtype=args.dtype, device=args.device, load_in_4bit=args.load_in_4bit)


def run(args: argparse.Namespace) -> dict:
    """The whole example; returns what it printed and the trained model (the smoke test checks them)."""
    from peft import PeftModel

    torch.manual_seed(args.seed)
    model, tok = load(args)
    calib = make_batches(load_calibration()[: args.probe_samples], tok, batch_size=4, max_length=args.max_length)
    scores = measure_signals(model, calib, rank=RANK, lora_alpha=ALPHA, progress=False)
    print(f"probe: {scores.num_samples} calibration samples, {len(scores.scores)} modules, dominant {scores.dominant_module}")
    pm = apply_domlora(model, scores, r=RANK, lora_alpha=ALPHA, budget=args.budget)
    train, held_out = sums_task(args.train_samples, args.seed), sums_task(args.eval_samples, args.seed + 1)
    trainer = _trainer(pm, tok, train, held_out, args)
    question = "What is 38 + 47?"
    before = {"loss": trainer.evaluate()["eval_loss"], "generation": generate(pm, tok, question, args.max_new_tokens)}
    trainer.train()
    after = {"loss": trainer.evaluate()["eval_loss"], "generation": generate(pm, tok, question, args.max_new_tokens)}
    print(f"held-out loss: before {before['loss']:.4f}, after {after['loss']:.4f} ({args.steps} steps)")
    print(f"generation for {question!r}:\n  before: {before['generation']!r}\n  after:  {after['generation']!r}")

    adapter = args.out_dir / "adapter"
    pm.save_pretrained(adapter)
    base, _ = load(args)
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        reloaded = PeftModel.from_pretrained(base, adapter).eval()
    pm.eval()
    batch = {k: v.to(pm.device) for k, v in make_batches(held_out[:4], tok, 4, args.max_length)[0].items() if k != "labels"}
    with torch.no_grad():
        diff = (pm(**batch).logits - reloaded(**batch).logits).abs().max().item()
    print(f"adapter: {adapter}; reloaded with PeftModel.from_pretrained: max |logit difference| {diff:.3g}")
    print(f"reloaded generation: {generate(reloaded, tok, question, args.max_new_tokens)!r}")
    return {"before": before, "after": after, "logit_diff": diff, "model": pm, "reloaded": reloaded, "batch": batch,
            "adapter": adapter}


def budget_arg(text: str) -> int | float | str:
    """``--budget`` as the CLI reads it ("1%", 20000 or 0.01), a bad value reported by argparse."""
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="as domlora --model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA: a bitsandbytes NF4 base")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16")
    ap.add_argument("--budget", type=budget_arg, default="1%", help="trainable parameters: a count, a fraction or a percentage of vanilla LoRA")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (constant)")
    ap.add_argument("--max-length", type=int, default=96, help="tokens per sample")
    ap.add_argument("--probe-samples", type=int, default=8, help="shipped calibration samples to probe on")
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=16, help="held-out samples of the loss before and after")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("domlora_out") / "finetune_example")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
