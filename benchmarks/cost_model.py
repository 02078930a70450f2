"""Cost model of the PAGE probe against the weight-gradient work it avoids.

From the repository root:
    python -m benchmarks.cost_model                 # per-module costs, 7B / 70B memory table
    python -m benchmarks.cost_model --check         # predicted vs measured time ratios, from
                                                    # benchmarks/results/{headline,tokens,width}.json

Per candidate module (``W: m x n``) and token, in multiply-adds (MACs):

- forward ``Y = X W^T``: ``m n``; backward to the input ``dX = D W``: ``m n`` (every provider,
  the floor included, does both);
- the weight-gradient GEMM ``G = D^T X``: ``m n`` (naive autograd, Opacus; the probe never does it);
- the probe adds ``P = X A^T`` in the forward (``n r``) and ``D^T P`` in the backward
  (``m r``): ``r (n + m)``.

Memory beyond the forward/backward itself: the probe keeps ``P`` (``tokens x r`` per module)
until its backward reduction; naive per-sample autograd forms a ``m x n`` gradient for every
module (the candidate weights' size again); torch.func's vmap holds ``B`` of them at once.

``--check`` turns the counts into predicted time ratios for the benchmark's workloads (the
same counts for the LM head and attention, which every provider runs) and prints them next
to the measured ratios, assuming time proportional to MACs (it is not, for small matmuls:
the comparison shows how far off it is).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: what the cost model needs."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def modules(self) -> list[tuple[str, int, int]]:
        """``(type, m, n)`` of the candidate linear modules of one layer (out x in)."""
        h, i = self.hidden, self.intermediate
        kv = h // self.heads * self.kv_heads
        return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def candidate_weights(self) -> int:
        return self.layers * sum(m * n for _, m, n in self.modules())

    def num_modules(self) -> int:
        return self.layers * len(self.modules())


SHAPES = {
    "smollm2-135m": Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152),
    "llama-2-7b": Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-70b": Shape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


def macs_per_token(s: Shape, tokens: int, rank: int) -> dict[str, float]:
    """MACs per token of one forward + backward-to-inputs (``floor``), and what the weight
    gradient and the probe add. Attention: ``QK^T`` and ``AV`` cost ``2 T h`` per token in the
    forward (full square, as SDPA computes it without a mask skip on CPU), twice in the backward."""
    lin = s.layers * sum(m * n for _, m, n in s.modules())
    head = s.vocab * s.hidden
    attn = s.layers * 2 * tokens * s.hidden
    floor = 2 * (lin + head) + 3 * attn
    return {
        "floor": floor,
        "weight_grad": lin,  # D^T X for every candidate
        "probe_extra": s.layers * sum(rank * (m + n) for _, m, n in s.modules()),
    }


def memory(s: Shape, batch: int, tokens: int, rank: int, bytes_per: int) -> dict[str, float]:
    """Extra bytes each method needs beyond the shared forward/backward."""
    w = s.candidate_weights() * bytes_per
    return {
        "probe_P": s.num_modules() * batch * tokens * rank * bytes_per,
        "probe_transient": batch * max(m for _, m, _ in s.modules()) * rank * 4,  # [B, m, r] float32, one module at a time
        "per_sample_autograd": w,  # one m x n gradient per module, held to the end of the backward
        "torch_func": batch * w,
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.1f} MB"


def report(rank: int, batch: int, tokens: int) -> None:
    print(f"Per module and token (multiply-adds), rank r={rank}:")
    print(f"{'model':<14}{'module':<11}{'m x n':>14}{'weight-grad mn':>16}{'probe r(n+m)':>14}{'ratio':>8}")
    for key in ("smollm2-135m", "llama-2-7b", "llama-2-70b"):
        s = SHAPES[key]
        for t, m, n in s.modules():
            print(f"{s.name:<14}{t:<11}{f'{m}x{n}':>14}{m * n:>16,}{rank * (m + n):>14,}{m * n / (rank * (m + n)):>8.0f}")
    print()
    print(f"Whole model, per token: forward+backward-to-inputs (floor), weight-gradient GEMMs (avoided), probe extra; "
          f"T={tokens}, r={rank}")
    for key in ("smollm2-135m", "llama-2-7b", "llama-2-70b"):
        s = SHAPES[key]
        c = macs_per_token(s, tokens, rank)
        print(f"  {s.name:<14} floor {c['floor'] / 1e9:7.2f} GMAC  weight-grad {c['weight_grad'] / 1e9:6.2f} GMAC "
              f"(+{100 * c['weight_grad'] / c['floor']:.0f}%)  probe +{c['probe_extra'] / 1e6:7.2f} MMAC "
              f"(+{100 * c['probe_extra'] / c['floor']:.2f}%)")
    print()
    print(f"Memory beyond the shared forward/backward, bf16 weights, B={batch}, T={tokens}, r={rank}:")
    print(f"{'model':<14}{'weights':>12}{'probe P':>12}{'probe [B,m,r]':>15}{'per-sample autograd':>21}{'torch.func (B x)':>18}")
    for key in ("smollm2-135m", "llama-2-7b", "llama-2-70b"):
        s = SHAPES[key]
        mem = memory(s, batch, tokens, rank, 2)
        print(f"{s.name:<14}{_gb(s.candidate_weights() * 2):>12}{_gb(mem['probe_P']):>12}{_gb(mem['probe_transient']):>15}"
              f"{_gb(mem['per_sample_autograd']):>21}{_gb(mem['torch_func']):>18}")


def _shape_of(spec: dict) -> Shape:
    if spec["model"] == "smollm2":
        return SHAPES["smollm2-135m"]
    return Shape("llama", spec["hidden"], spec["intermediate"], spec["layers"], spec["heads"], spec["kv_heads"], spec["vocab"])


def check() -> int:
    """Predicted (MAC-proportional) vs measured time ratios for the saved benchmark points."""
    found = False
    print(f"{'workload':<10}{'point':<24}{'autograd/floor pred':>20}{'meas':>7}{'probe/floor pred':>18}{'meas':>7}")
    for name in ("headline", "tokens", "width"):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        found = True
        for pt in json.loads(path.read_text())["points"]:
            rows = pt["providers"]
            if "floor" not in rows:
                continue
            c = macs_per_token(_shape_of(pt["spec"]), pt["tokens"], pt["rank"])
            fl = rows["floor"]["median_s"]
            ag = f"{rows['autograd']['median_s'] / fl:.2f}" if "autograd" in rows else "-"
            pr = f"{rows['probe']['median_s'] / fl:.2f}" if "probe" in rows else "-"
            print(f"{name:<10}{pt['label']:<24}{(c['floor'] + c['weight_grad']) / c['floor']:>20.2f}{ag:>7}"
                  f"{(c['floor'] + c['probe_extra']) / c['floor']:>18.3f}{pr:>7}")
    if not found:
        print("no results in benchmarks/results/; run python -m benchmarks.bench_probe --workload all first")
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--check", action="store_true", help="compare with the measured sweeps")
    args = ap.parse_args(argv)
    if min(args.rank, args.batch, args.tokens) < 1:
        ap.error("--rank, --batch and --tokens must be >= 1")
    if args.check:
        return check()
    report(args.rank, args.batch, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
