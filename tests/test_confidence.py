"""Seed and bootstrap statistics of the dominant module, on synthetic energies with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from domlora_kernels.confidence import Confidence, confidence
from domlora_kernels.stats import kendall_tau, rankdata, spearman
from domlora_kernels.scores import ModuleInfo, PageScores


def from_energies(e: torch.Tensor, estimator: str = "fisher") -> PageScores:
    """A PageScores whose modules ``m.0 .. m.{M-1}`` have per-sample energies ``e`` [M, k, N]."""
    m, k, n = e.shape
    names = [f"m.{i}" for i in range(m)]
    by_seed = {s: {nm: float(e[i, s].mean()) for i, nm in enumerate(names)} for s in range(k)}
    scores = {nm: float(e[i].mean()) for i, nm in enumerate(names)}
    per = {nm: e[i].clone() for i, nm in enumerate(names)} if estimator == "fisher" else None
    modules = {nm: ModuleInfo(i, "proj", 8, 8) for i, nm in enumerate(names)}
    config = {"rank": 8, "projection": "A", "estimator": estimator, "seeds": list(range(k)), "scaling": 1.0}
    return PageScores(scores, by_seed, per, modules, n, config)


def noisy(m: int, k: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, k, n, generator=g, dtype=torch.float64)


def test_clearly_dominant_module_wins_everything():
    e = noisy(6, 8, 40)
    e[3] += 5.0
    c = confidence(from_energies(e), num_resamples=200)
    assert c.dominant == "m.3"
    assert c.bootstrap_top1 == {"m.3": 1.0} and c.seed_top1 == {"m.3": 8}
    share = float(e[3].mean() / e.mean(dim=(1, 2)).sum())
    assert c.share == pytest.approx(share)
    assert c.sentence() == f"dominant: m.3 (share {100 * share:.0f}%, top-1 in 100% of 200 resamples and 8/8 seeds)"
    lo, hi = c.share_interval["m.3"]
    assert lo < share < hi


def test_two_equal_modules_split_the_bootstrap_about_evenly():
    # m.1 holds m.0's energies with the samples swapped in pairs: both means are exactly equal and
    # the bootstrap distribution is symmetric between them, so each wins about half the resamples
    n = 200
    base = noisy(1, 1, n, seed=1)[0, 0] * 10
    swapped = base.view(-1, 2).flip(1).reshape(-1)
    e = torch.stack([base, swapped, torch.full((n,), 0.1, dtype=torch.float64)]).unsqueeze(1)
    c = confidence(from_energies(e), num_resamples=2000, seed=3)
    assert set(c.bootstrap_top1) == {"m.0", "m.1"}
    assert c.bootstrap_top1["m.0"] == pytest.approx(0.5, abs=0.05)
    assert c.bootstrap_top1["m.0"] + c.bootstrap_top1["m.1"] == pytest.approx(1.0)


def test_seed_axis_counts_each_seeds_argmax():
    e = torch.ones(3, 8, 10, dtype=torch.float64)
    e[0, 0::2] += 1.0  # even seeds: m.0 on top
    e[1, 1::2] += 1.0  # odd seeds: m.1 on top
    e[0, 0::2, 0] += 0.5  # and m.0 slightly higher overall
    c = confidence(from_energies(e))
    assert c.seed_top1 == {"m.0": 4, "m.1": 4}
    assert c.sentence().endswith("and 4/8 seeds)")
    assert c.num_seeds == 8


def test_bootstrap_is_reproducible_and_depends_on_its_seed():
    s = from_energies(noisy(5, 2, 30, seed=7))
    a, b, other = confidence(s, 300, seed=11), confidence(s, 300, seed=11), confidence(s, 300, seed=12)
    assert a.bootstrap_top1 == b.bootstrap_top1 and a.share_interval == b.share_interval
    assert a.bootstrap_top1 != other.bootstrap_top1


def test_vectorised_bootstrap_matches_a_loop_over_resamples():
    e = noisy(7, 3, 25, seed=2)
    s = from_energies(e)
    c = confidence(s, num_resamples=60, seed=5)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(25, (60, 25), generator=g)
    ebar = e.mean(dim=1)
    wins = torch.zeros(7)
    shares = []
    for r in range(60):
        means = ebar[:, idx[r]].mean(dim=1)
        wins[int(means.argmax())] += 1
        shares.append(means / means.sum())
    assert c.bootstrap_top1 == {f"m.{i}": w / 60 for i, w in enumerate(wins.tolist()) if w}
    q = torch.quantile(torch.stack(shares, dim=1), torch.tensor([0.05, 0.95], dtype=torch.float64), dim=1)
    for i in range(7):
        assert c.share_interval[f"m.{i}"] == pytest.approx((float(q[0, i]), float(q[1, i])), rel=1e-12)


def test_seed_spearman():
    e = torch.arange(1.0, 6.0, dtype=torch.float64).view(5, 1, 1).expand(5, 3, 4).clone()
    assert confidence(from_energies(e)).seed_spearman == pytest.approx(1.0)
    e2 = torch.stack([torch.arange(1.0, 6.0), torch.arange(5.0, 0.0, -1)], dim=1).to(torch.float64)  # [5, 2]
    assert confidence(from_energies(e2.unsqueeze(-1).expand(5, 2, 3).clone())).seed_spearman == pytest.approx(-1.0)
    assert confidence(from_energies(noisy(4, 1, 5))).seed_spearman is None


def test_concentration():
    e = torch.full((4, 1, 3), 1e-300, dtype=torch.float64)
    e[2] = 1.0
    c = confidence(from_energies(e))
    assert c.share == pytest.approx(1.0) and c.entropy == pytest.approx(0.0, abs=1e-9)
    flat = confidence(from_energies(torch.ones(4, 1, 3, dtype=torch.float64)))
    assert flat.entropy == pytest.approx(1.0) and flat.share == pytest.approx(0.25)


def test_gradient_estimator_gives_seed_statistics_only():
    e = noisy(4, 3, 6)
    e[1] += 3
    c = confidence(from_energies(e, estimator="gradient"))
    assert c.num_resamples is None and c.bootstrap_top1 is None and c.share_interval is None
    assert c.seed_top1 == {"m.1": 3}
    assert c.sentence() == (f"dominant: m.1 (share {100 * c.share:.0f}%, top-1 in 3/3 seeds; no bootstrap: "
                            f"estimator 'gradient' keeps no per-sample energies)")


def test_json_round_trip_and_bad_input():
    c = confidence(from_energies(noisy(4, 2, 6)), num_resamples=20)
    back = Confidence.from_dict(json.loads(json.dumps(c.to_dict(), allow_nan=False)))
    assert back == c
    old = {**c.to_dict(), "top1_share": c.share}  # reports written before top1_share was dropped carry it
    assert Confidence.from_dict(old) == c and "top1_share" not in c.to_dict()
    s = from_energies(noisy(4, 2, 6))
    with pytest.raises(ValueError, match="num_resamples must be an integer >= 1"):
        confidence(s, num_resamples=0)
    s.per_sample["m.0"] = s.per_sample["m.0"][:, :3]
    with pytest.raises(ValueError, match="inconsistent"):
        confidence(s)


def test_rank_correlations_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = x + torch.randint(-2, 3, (40,), generator=g).double()
    assert rankdata(x).tolist() == pytest.approx(stats.rankdata(x.numpy()).tolist())
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, rel=1e-12)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x.numpy(), y.numpy()).statistic, rel=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])
