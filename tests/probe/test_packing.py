"""Packed rows (several samples per row, position_ids restarting) are measured per sample."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from domlora_kernels import page_scores
from domlora_kernels.probe.packing import is_packed, segment_starts, unpack
from domlora_kernels.testing import rel_err
from domlora_kernels.testing import VOCAB, tiny_model

LENGTHS = [5, 9, 7, 4]


def _samples(seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _padded(samples) -> dict[str, torch.Tensor]:
    width = max(map(len, samples))
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _packed(samples) -> dict[str, torch.Tensor]:
    """Two packed rows built by transformers' own collator, right-padded to one width."""
    collate = DataCollatorWithFlattening()
    rows = [collate([{"input_ids": s} for s in samples[:2]]), collate([{"input_ids": s} for s in samples[2:]])]
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": torch.zeros(2, width, dtype=torch.long), "labels": torch.full((2, width), -100),
           "position_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": torch.zeros(2, width, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        for key in ("input_ids", "labels", "position_ids"):
            out[key][i, :n] = r[key][0]
        out["attention_mask"][i, :n] = 1
    return out


def test_segments_found_and_padding_never_starts_one():
    packed = _packed(_samples())
    assert is_packed(packed)
    assert segment_starts(packed["position_ids"], packed["attention_mask"]) == [[0, 5], [0, 7]]
    # a left-padded, unpacked row whose pads carry position id 1 (as generate() makes them) is one sample
    pos = torch.tensor([[1, 1, 0, 1, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert not is_packed({"input_ids": pos, "position_ids": pos, "attention_mask": mask})
    assert not is_packed({"input_ids": pos, "position_ids": torch.arange(6)[None]})


def test_unpack_gives_the_samples_in_order():
    samples = _samples()
    rows = unpack(_packed(samples), 0)
    for i, s in enumerate(samples):
        n = len(s)
        assert rows["input_ids"][i, :n].tolist() == s
        assert rows["attention_mask"][i].sum() == n
        assert (rows["labels"][i, n:] == -100).all()


@pytest.mark.parametrize("projection,estimator", [("A", "fisher"), ("expected", "fisher"), ("AB", "gradient")])
def test_packed_rows_score_as_the_same_samples_padded(projection, estimator):
    model = tiny_model("llama", dtype=torch.float64)
    samples = _samples()
    kw = dict(rank=4, projection=projection, estimator=estimator, progress=False)
    ref = page_scores(model, [_padded(samples)], **kw)
    got = page_scores(model, [_packed(samples)], **kw)
    assert got.num_samples == len(LENGTHS)
    names = list(ref.scores)
    err = rel_err(torch.tensor([got.scores[n] for n in names]), torch.tensor([ref.scores[n] for n in names]))
    assert err < 1e-10
    if estimator == "fisher":
        assert max(rel_err(got.per_sample[n], ref.per_sample[n]) for n in names) < 1e-10


def test_packed_rows_with_a_loss_fn_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="packed .* loss_fn"):
        page_scores(model, [_packed(_samples())], rank=2, progress=False, loss_fn=lambda m, b: None)


def test_packed_rows_with_an_unknown_per_token_key_are_refused():
    batch = _packed(_samples())
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with pytest.raises(ValueError, match="token_type_ids"):
        page_scores(tiny_model("llama"), [batch], rank=2, progress=False)
