"""Worker for tests/test_distributed.py, launched by torchrun (not collected by pytest).

Every rank probes its shard (contiguous, :func:`domlora_kernels.distributed.shard`) of the
same batches under several set-ups, for every projection x estimator, and writes what it
got to ``<out>/rank<r>.json``; the test compares each rank with one process on all batches.
One launch computes everything, since each torchrun start costs seconds.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from domlora_kernels.testing import sample_batch, tiny_model  # noqa: E402
from domlora_kernels.testing import tiny_moe  # noqa: E402
from domlora_kernels.testing import COMBOS  # noqa: E402

from domlora_kernels import page_scores  # noqa: E402
from domlora_kernels.distributed import shard  # noqa: E402
from domlora_kernels.probe.losses import causal_lm_losses, default_labels  # noqa: E402

# 5 batches of uneven sizes: 2 ranks get 3 and 2 batches (7 and 6 samples)
LENGTHS = [[9, 5, 12], [7, 12], [4, 11, 6], [10, 3], [8, 8, 5, 12]]


def all_batches():
    return [sample_batch(lens, seed=i) for i, lens in enumerate(LENGTHS)]


def seeds_for(projection):
    return 0 if projection == "expected" else [0, 5]


def probe_all(model, batches):
    out = {}
    for projection, estimator in COMBOS:
        s = page_scores(model, batches, rank=3, projection=projection, estimator=estimator,
                        seed=seeds_for(projection), progress=False)
        out[f"{projection}-{estimator}"] = s.to_dict()
    return out


def interrupted_probe(batches, interrupt: bool) -> str | None:
    """Probe with a loss that raises KeyboardInterrupt at the second batch when ``interrupt``."""
    seen = []

    def loss_fn(model, batch):
        seen.append(batch)
        if interrupt and len(seen) == 2:
            raise KeyboardInterrupt
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return causal_lm_losses(logits, default_labels(batch["input_ids"], batch["attention_mask"]))

    try:
        page_scores(tiny_model("llama", torch.float64), batches, rank=3, loss_fn=loss_fn, progress=False)
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt is what this records
        return f"{type(e).__name__}: {e}"
    return None


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = all_batches()
    res: dict = {"rank": rank, "world": world}

    # 1. replicated model, uneven shards (3 and 2 batches)
    res["plain"] = probe_all(tiny_model("llama", torch.float64), shard(batches))

    # 1b. a mixture-of-experts model: expert weights' per-expert energies merged over the ranks
    # (eager experts: grouped_mm takes no float64)
    res["moe"] = probe_all(tiny_moe("mixtral", torch.float64, experts_implementation="eager"), shard(batches))

    # 2. DDP-wrapped (trainable, as in a fine-tuning script), then one DDP training step to
    # show the wrapper still works after the probe: its gradients must be averaged over ranks.
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(tiny_model("llama", torch.float64))
    res["ddp"] = probe_all(ddp, shard(batches))
    res["ddp_requires_grad"] = all(p.requires_grad for p in ddp.parameters())
    res["ddp_grad_none"] = all(p.grad is None for p in ddp.parameters())
    ddp.train()
    mine = shard(batches)[0]
    ddp(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"], labels=mine["input_ids"]).loss.backward()
    res["ddp_grad_after_step"] = [float(p.grad.double().norm()) for p in list(ddp.parameters())[:4]]

    # 3. FSDP2 on the decoder layers and the root; every rank needs the same number of batches
    # (FSDP all-gathers in every forward), so the first 4 batches: 2 per rank.
    try:
        from torch.distributed.fsdp import fully_shard

        model = tiny_model("llama", torch.float64)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        res["fsdp"] = probe_all(model, shard(batches[:4]))
        # FSDP2 + non-reentrant activation checkpointing, the set-up for a 70B model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        res["fsdp_ckpt"] = probe_all(model, shard(batches[:4]))
        hook.remove()
        res["fsdp_ckpt_calls_per_batch"] = len(calls) / (len(COMBOS) * len(shard(batches[:4])))
        # the README's recipe for a model too big for one host: build on the meta device,
        # shard, then rank 0 alone reads the weights and broadcasts them into the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        ref = tiny_model("llama", torch.float64)
        with torch.device("meta"):
            big = type(ref)(ref.config).to(torch.float64)
        for layer in big.model.layers:
            fully_shard(layer)
        fully_shard(big)
        big.to_empty(device="cpu")
        big.model.rotary_emb = type(big.model.rotary_emb)(big.config)  # non-persistent buffer: rebuild
        full = ref.state_dict() if rank == 0 else {}
        set_model_state_dict(big, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        res["fsdp_meta"] = probe_all(big.eval(), shard(batches[:4]))
        # uneven batch counts must be refused up front, not hang
        try:
            page_scores(model, shard(batches), rank=3, progress=False)
            res["fsdp_uneven_error"] = None
        except ValueError as e:
            res["fsdp_uneven_error"] = str(e)
    except Exception:  # reported to the test, which fails with this traceback
        res["fsdp_error"] = traceback.format_exc()

    # 4. an error on one rank stops every rank with a clear message instead of a hang
    bad = shard(batches)
    if rank == world - 1:
        bad = bad + [{"ids": bad[0]["input_ids"]}]
    try:
        page_scores(tiny_model("llama", torch.float64), bad, rank=3, progress=False)
        res["error"] = None
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"

    # 5. Ctrl-C on one rank mid-probe: it re-raises KeyboardInterrupt, the others get an error
    # instead of waiting for it forever (the test's subprocess timeout catches a hang)
    res["interrupt"] = interrupted_probe(shard(batches), rank == world - 1)

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
