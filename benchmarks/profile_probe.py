"""Where the probe's time and memory go, next to the floor (same forward and backward, no probe).

From the repository root:
    python -m benchmarks.profile_probe [--batch 8 --tokens 128 --rank 8] [--top 15]
    python -m benchmarks.profile_probe --pair probe-expected,opacus    # any two providers

On the embedded SmolLM2-135M with the headline's inputs, one warm run of each provider:

1. what autograd saves for the backward pass (``saved_tensors_hooks``; unique storages,
   so a tensor saved by several ops counts once), and the tensors each provider keeps
   outside autograd (the probe's ``P``);
2. peak RSS of the run in this process (VmHWM, reset before each run through
   ``/proc/self/clear_refs``), run order floor, probe, floor, probe;
3. ``torch.profiler``: the operators with the most self CPU time, floor and probe side by
   side, and the totals.

This is the evidence for where a target of ``benchmarks.bench_probe`` is missed; it measures the
package as it is (no patching).
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict

import torch

from benchmarks.bench_probe import _vm_hwm, build_model, make_ids
from benchmarks.providers import PROVIDERS


def saved_bytes(provider) -> tuple[int, int, dict[str, int]]:
    """(unique bytes saved for backward, number of saved tensors, bytes by dtype/shape kind)."""
    seen: dict[tuple, int] = {}
    count = 0
    by_rank: dict[str, int] = defaultdict(int)

    def pack(t):
        nonlocal count
        count += 1
        try:
            key = (t.untyped_storage().data_ptr(),)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = (id(t),), t.numel() * t.element_size()
        if key not in seen:
            seen[key] = nbytes
            by_rank[f"{t.dim()}-D {t.dtype}"] += nbytes
        return t

    provider.prepare()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        provider.run()
    provider.teardown()
    return sum(seen.values()), count, dict(by_rank)


def peak_rss(provider) -> int:
    gc.collect()
    provider.prepare()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_hwm()
    provider.run()
    peak = _vm_hwm()
    provider.teardown()
    return peak - base


def profile(provider, top: int):
    from torch.profiler import ProfilerActivity, profile as tprofile

    provider.prepare()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        provider.run()
    provider.teardown()
    rows = {}
    for e in prof.key_averages():
        rows[e.key] = (e.self_cpu_time_total / 1e3, e.count)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--pair", default="floor,probe", help="the two providers to set side by side (default floor,probe)")
    args = ap.parse_args(argv)
    pair = args.pair.split(",")
    if len(pair) != 2 or not set(pair) <= set(PROVIDERS):
        ap.error(f"--pair takes two of {', '.join(PROVIDERS)}, comma-separated; got {args.pair!r}")
    a, b = pair
    model = build_model({"model": "smollm2"})
    ids = make_ids(model, args.batch, args.tokens)
    provs = {n: PROVIDERS[n](model, ids, args.rank) for n in pair}
    for p in provs.values():  # warm: first-call allocations and lazy inits
        p.prepare()
        p.run()
        p.teardown()

    print(f"SmolLM2-135M, B={args.batch}, T={args.tokens}, r={args.rank}")
    for n, p in provs.items():
        total, count, kinds = saved_bytes(p)
        print(f"saved for backward, {n:<6}: {total / 2**20:8.1f} MiB in {count} saved tensors; "
              + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:4]))
    n_mod = len(provs[b].cands)
    print(f"probe's P kept outside autograd: {n_mod} modules x [{args.batch}, {args.tokens}, {args.rank}] float32 = "
          f"{n_mod * args.batch * args.tokens * args.rank * 4 / 2**20:.1f} MiB")
    # warm, in this process: memory freed by earlier runs is still resident, so this is the
    # growth of RSS over the run, comparable between the two, not their full footprint
    print("peak RSS growth over a warm run (VmHWM): "
          + ", ".join(f"{n} +{peak_rss(p) / 2**20:.0f} MiB" for n, p in provs.items()), flush=True)

    prof = {n: profile(p, args.top) for n, p in provs.items()}
    keys = sorted(set(prof[a]) | set(prof[b]), key=lambda k: -max(prof[a].get(k, (0, 0))[0], prof[b].get(k, (0, 0))[0]))
    print(f"\n{'operator (self CPU ms, calls)':<44}{a[:16]:>18}{b[:16]:>18}{'difference':>15}")
    for k in keys[: args.top]:
        f, p = prof[a].get(k, (0.0, 0)), prof[b].get(k, (0.0, 0))
        print(f"{k[:43]:<44}{f[0]:>11.1f} ({f[1]:>4}){p[0]:>11.1f} ({p[1]:>4}){p[0] - f[0]:>15.1f}")
    tf = sum(v[0] for v in prof[a].values())
    tp = sum(v[0] for v in prof[b].values())
    print(f"{'total self CPU':<44}{tf:>18.1f}{tp:>18.1f}{tp - tf:>15.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
