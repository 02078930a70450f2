"""Reports: the share grid, PNG plots that show something, text, compare on known inputs, JSON compatibility."""

from __future__ import annotations

import math

import pytest
import torch

from domlora_kernels.confidence import Confidence, confidence
from domlora_kernels.report import compare, plot_heatmap, plot_report, plot_top, share_grid, text_report
from domlora_kernels.scores import ModuleInfo, PageScores

TYPES = ["q_proj", "v_proj", "down_proj"]


def layered(pages: list[float], layers: int = 4, seeds: int = 2, samples: int = 6, extra_other: bool = False) -> PageScores:
    """Scores over ``layers x TYPES`` modules with the given PAGE (model order), per-sample energies around them."""
    names = [f"model.layers.{i}.{t}" for i in range(layers) for t in TYPES]
    if extra_other:
        names.append("score")
    assert len(pages) == len(names)
    g = torch.Generator().manual_seed(0)
    noise = 0.9 + 0.2 * torch.rand(len(names), seeds, samples, generator=g, dtype=torch.float64)
    e = torch.tensor(pages, dtype=torch.float64).view(-1, 1, 1) * noise
    e = e / e.mean(dim=(1, 2), keepdim=True) * torch.tensor(pages, dtype=torch.float64).view(-1, 1, 1)
    per = {n: e[i] for i, n in enumerate(names)}
    by_seed = {s: {n: float(e[i, s].mean()) for i, n in enumerate(names)} for s in range(seeds)}
    modules = {n: ModuleInfo(None if n == "score" else int(n.split(".")[2]), n.rsplit(".", 1)[-1], 8, 8) for n in names}
    config = {"rank": 8, "projection": "A", "estimator": "fisher", "seeds": list(range(seeds)), "scaling": 1.0,
              "lora_alpha": None, "use_rslora": False}
    return PageScores({n: float(e[i].mean()) for i, n in enumerate(names)}, by_seed, per, modules, samples, config,
                      {"model": "synthetic"})


def test_share_grid_places_each_module():
    pages = [float(i + 1) for i in range(12)] + [2.0]
    s = layered(pages, extra_other=True)  # "score": no layer index, a type of its own
    grid, rows, cols = share_grid(s)
    assert rows == ["0", "1", "2", "3", "other"] and cols == TYPES + ["score"]
    tot = sum(pages)
    assert grid[2, 1].item() == pytest.approx(8 / tot)  # model.layers.2.v_proj is the 8th module
    assert grid[4, 3].item() == pytest.approx(2 / tot)
    assert math.isnan(grid[4, 0].item()) and math.isnan(grid[0, 3].item())
    assert int(torch.isnan(grid).sum()) == 4 + 3
    assert torch.nansum(grid).item() == pytest.approx(1.0)


def _png_stats(path):
    image = pytest.importorskip("matplotlib.image")
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = image.imread(path)
    return img.shape, float(img[..., :3].var())


@pytest.mark.parametrize("log_scale", [False, True], ids=["linear", "log"])
def test_heatmap_png_has_the_size_and_shows_something(tmp_path, log_scale):
    pytest.importorskip("matplotlib")
    s = layered([1.0] * 11 + [30.0])
    path = plot_heatmap(s, tmp_path / "sub" / "h.png", log_scale=log_scale, dpi=50)
    (h, w, _), var = _png_stats(path)
    assert (w, h) == (round((2.6 + 0.95 * 3) * 50), round((1.9 + 0.28 * 4) * 50))
    assert var > 1e-3  # not a blank canvas


def test_top_chart_png_with_and_without_confidence(tmp_path):
    pytest.importorskip("matplotlib")
    s = layered([float(i + 1) for i in range(12)])
    conf = confidence(s, num_resamples=30)
    for c, name in ((None, "a.png"), (conf, "b.png")):
        path = plot_top(s, tmp_path / name, top=5, conf=c, dpi=40)
        (h, w, _), var = _png_stats(path)
        assert (w, h) == (round(8.5 * 40), round((1.4 + 0.32 * 5) * 40)) and var > 1e-3
    paths = plot_report(s, tmp_path / "r" / "page.json", conf=conf, top=4)
    assert [p.name for p in paths] == ["page_heatmap.png", "page_top.png"] and all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="must end in .png"):
        plot_top(s, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="top must be an integer"):
        plot_top(s, tmp_path / "x.png", top=0)


def test_text_report_includes_table_and_confidence():
    s = layered([float(i + 1) for i in range(12)])
    conf = confidence(s, num_resamples=50)
    text = text_report(s, conf, top=3)
    assert s.table(3) in text
    assert conf.sentence() in text
    assert "dominant module: model.layers.3.down_proj" in text
    assert "mean pairwise Spearman" in text


def test_confidence_travels_in_the_json_report(tmp_path):
    s = layered([float(i + 1) for i in range(12)])
    conf = confidence(s, num_resamples=25)
    s.meta["confidence"] = conf.to_dict()
    back = PageScores.from_json(s.to_json(tmp_path / "r.json"))
    assert Confidence.from_dict(back.meta["confidence"]) == conf
    assert back.meta["confidence"]["sentence"] == conf.sentence()
    assert back.scores == s.scores


def test_compare_identical_reversed_and_partial():
    up = layered([float(i + 1) for i in range(12)])
    c = compare(up, up)
    assert c.same_dominant and c.spearman == pytest.approx(1.0) and c.kendall == pytest.approx(1.0)
    assert c.overlap == c.top_a and len(c.overlap) == 5
    down = layered([float(12 - i) for i in range(12)])
    c = compare(up, down, top=5)
    assert not c.same_dominant and c.spearman == pytest.approx(-1.0) and c.kendall == pytest.approx(-1.0)
    assert c.overlap == []
    # swap the top two of b: still 5/5 overlap, different dominant, one discordant pair of 66
    pages = [float(i + 1) for i in range(12)]
    pages[10], pages[11] = pages[11], pages[10]
    c = compare(up, layered(pages), top=5)
    assert not c.same_dominant and len(c.overlap) == 5
    assert c.kendall == pytest.approx((65 - 1) / 66)
    assert "top-5 overlap: 5/5" in c.text() and "same dominant module: no" in c.text()


def test_compare_against_scipy_and_errors():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    b = a + 0.3 * torch.rand(12, generator=g, dtype=torch.float64)
    c = compare(layered(a.tolist()), layered(b.tolist()))
    sa = [layered(a.tolist()).scores[n] for n in layered(a.tolist()).scores]
    sb = [layered(b.tolist()).scores[n] for n in layered(b.tolist()).scores]
    assert c.spearman == pytest.approx(stats.spearmanr(sa, sb).statistic, rel=1e-12)
    assert c.kendall == pytest.approx(stats.kendalltau(sa, sb).statistic, rel=1e-12)
    other = layered([1.0] * 9, layers=3)
    with pytest.raises(ValueError, match="cover different modules"):
        compare(layered([1.0] * 12), other)
    with pytest.raises(ValueError, match="top must be an integer between 1 and 12"):
        compare(layered(a.tolist()), layered(b.tolist()), top=13)
    d = layered(b.tolist())
    d.config["projection"] = "expected"
    assert any("projection" in n for n in compare(layered(a.tolist()), d).notes)
