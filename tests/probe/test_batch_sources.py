"""page_scores takes any iterable of batches: a torch DataLoader gives what a list gives."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from domlora_kernels import page_scores
from domlora_kernels.data import collate
from domlora_kernels.testing import VOCAB, tiny_model


def test_a_dataloader_scores_like_the_same_batches_in_a_list():
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist()} for n in (6, 9, 4, 7, 5)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    loader = DataLoader(rows, batch_size=2, collate_fn=lambda b: collate(b, pad_id=0))
    model = tiny_model("llama", dtype=torch.float64)
    from_loader = page_scores(model, loader, rank=4, progress=False)
    from_list = page_scores(model, list(loader), rank=4, progress=False)
    assert from_loader.num_samples == 5 and from_loader.meta["num_batches"] == 3
    for n, v in from_list.per_sample.items():
        assert torch.equal(from_loader.per_sample[n], v)
