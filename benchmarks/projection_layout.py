"""The probe's skinny projection ``P = X A^T`` on the CPU, in its two layouts, side by side.

    python -m benchmarks.projection_layout            # SmolLM2's shapes, B*T = 1024 rows, one thread
    python -m benchmarks.projection_layout --probe    # + the whole probe in each layout against the floor

``X A^T`` (``[N, n] @ [n, c]``) and ``(A X^T)^T`` (``[c, n] @ [n, N]``, read back transposed)
give the same numbers; MKL runs them at different speeds. Rounds interleave the two and the
median of each is printed with their ratio. With ``--probe``, the probe on SmolLM2-135M (B=8,
T=128, r=8, random ids, one thread) in each layout (``energies.CPU_TRANSPOSED_PROJECTION``) and
the floor, interleaved, each round's ratios to the floor. Output:
``benchmarks/results/projection_layout.txt``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import bench_probe as B

# (n, c): q/k/v's shared projection (3 x rank 8), o_proj's, gate/up's shared (2 x 8), down_proj's
SHAPES = [(576, 24), (576, 8), (576, 16), (1536, 8)]


def _time(f, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls


def run(rows: int, rounds: int, calls: int) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    for n, c in SHAPES:
        x = torch.randn(rows, n, generator=g)
        a = torch.randn(c, n, generator=g)
        ref = x.double() @ a.double().T  # both layouts agree with float64 to float32 rounding
        for got in (x @ a.T, (a @ x.T).T):
            assert float((got.double() - ref).norm() / ref.norm()) < 1e-6
        times = {"X A^T": [], "(A X^T)^T": []}
        fs = {"X A^T": lambda: x @ a.T, "(A X^T)^T": lambda: (a @ x.T).T}
        for f in fs.values():
            f()
        for r in range(rounds):
            for name in (list(fs) if r % 2 == 0 else list(fs)[::-1]):
                times[name].append(_time(fs[name], calls))
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"n": n, "c": c, "rows": rows, "median_ms": {k: 1e3 * v for k, v in med.items()},
                    "ratio": med["(A X^T)^T"] / med["X A^T"]})
    return out


def run_probe(rounds: int) -> dict:
    """The probe in each layout and the floor on SmolLM2, interleaved by the harness (one warm-up round)."""
    from benchmarks import providers as P

    model = B.build_model(B.SMOLLM2)
    ids = B.make_ids(model, 8, 128)
    names = ["probe-xat", "probe", "floor"]
    times, energies, _ = B.time_providers(model, ids, 8, names, 1, rounds, log=lambda *a, **k: None)
    return {"times_s": times, "median_s": {n: statistics.median(times[n]) for n in names},
            "max_rel_diff": P.rel_err(energies["probe"], energies["probe-xat"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="B*T rows of X (default 1024: B=8, T=128)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round")
    ap.add_argument("--probe", action="store_true", help="also time the whole probe in each layout against the floor")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run(args.rows, args.rounds, args.calls)
    lines = [f"command: python -m benchmarks.projection_layout --rows {args.rows} --rounds {args.rounds} --calls {args.calls}"
             + (" --probe" if args.probe else ""),
             f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average {B.os.getloadavg()}",
             f"machine: {B.machine_line({**B.machine(), 'malloc_env_memory_children': None})}; one torch thread",
             "", f"{'n':>5} {'c':>3}  {'X A^T ms':>9}  {'(A X^T)^T ms':>12}  ratio"]
    for r in res:
        ms = r["median_ms"]
        lines.append(f"{r['n']:>5} {r['c']:>3}  {ms['X A^T']:>9.3f}  {ms['(A X^T)^T']:>12.3f}  {r['ratio']:.3f}")
    if args.probe:
        p = run_probe(args.rounds)
        med, f = p["median_s"], p["median_s"]["floor"]
        lines += ["", f"the whole probe, SmolLM2-135M B=8 T=128 r=8, {args.rounds} interleaved rounds (+1 warm-up), "
                      f"PAGE of the two layouts within {p['max_rel_diff']:.1e} relative:"]
        label = {"probe-xat": "probe, X A^T", "probe": "probe, (A X^T)^T", "floor": "floor"}
        lines += [f"  {label[n]:<18} median {v:.3f} s  x floor {v / f:.3f}" for n, v in med.items()]
        per = [f"{a / c:.3f}/{b / c:.3f}" for a, b, c in zip(*(p["times_s"][n] for n in med))]
        lines.append("  per round, X A^T / (A X^T)^T against the floor: " + ", ".join(per))
    text = "\n".join(lines) + "\n"
    print(text)
    (B.RESULTS / "projection_layout.txt").write_text(text)


if __name__ == "__main__":
    main()
