"""Peak memory of the probe against the floor, with glibc's allocator fixed and as it is.

    python -m benchmarks.memory_floor             # SmolLM2, B=8, T=128, r=8; 3 fresh processes per cell
    python -m benchmarks.memory_floor --repeats 5

Each cell is a fresh process (``bench_probe.child_memory``: model loaded, one provider run, peak
RSS over the loaded model). Two allocator settings: glibc's defaults (no ``MALLOC_*`` variable), and the mmap threshold fixed
at 128 KiB (``bench_probe.FIXED_MALLOC``), which stops glibc from moving it after each large
free. Peak memory is not moved by CPU load, so this can run beside other jobs. Output:
``benchmarks/results/memory_floor.txt`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import bench_probe as B

POINT = {"spec": B.SMOLLM2, "batch": 8, "tokens": 128, "rank": 8, "label": "smollm2 B=8 T=128 r=8"}
SETTINGS = {"glibc defaults": {}, "mmap threshold fixed at 128 KiB": B.FIXED_MALLOC}
PROVIDERS = ("floor", "probe")


def run(repeats: int, log=print) -> dict:
    cells = {}
    for setting, env in SETTINGS.items():
        for r in range(repeats):
            for name in PROVIDERS:  # interleaved, so that nothing of the machine's drifts onto one side
                m = B.measure_memory(POINT, name, log, malloc=env)
                if "error" in m:
                    raise RuntimeError(f"{name} ({setting}): {m['error']}")
                cells.setdefault(setting, {}).setdefault(name, []).append(
                    {"peak_mib": m["peak_bytes"] / 2**20, "delta_mib": m["delta_bytes"] / 2**20})
                log(f"  {setting}, round {r + 1}: {name} peak {m['peak_bytes'] / 2**20:,.0f} MiB, "
                    f"over the loaded model {m['delta_bytes'] / 2**20:,.0f} MiB")
    return cells


def table(cells: dict) -> str:
    lines = ["allocator                          provider   peak MiB (each run)            median  run MiB median  "
             "x floor (peak)  x floor (run)"]
    for setting, by in cells.items():
        med = {n: (statistics.median(x["peak_mib"] for x in runs), statistics.median(x["delta_mib"] for x in runs))
               for n, runs in by.items()}
        for n, runs in by.items():
            each = ", ".join(f"{x['peak_mib']:,.0f}" for x in runs)
            lines.append(f"{setting:<34} {n:<10} {each:<30} {med[n][0]:>7,.0f} {med[n][1]:>14,.0f}  "
                         f"{med[n][0] / med['floor'][0]:>13.3f}  {med[n][1] / med['floor'][1]:>13.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per provider and setting (default 3)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    t0 = time.time()
    cells = run(args.repeats)
    m = B.machine()
    text = "\n".join([
        f"command: python -m benchmarks.memory_floor --repeats {args.repeats}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {time.time() - t0:.0f} s",
        f"machine: {B.machine_line({**m, 'malloc_env_memory_children': None})}; allocator per row below",
        f"point: {POINT['label']} (peak RSS of a fresh process, model included; run MiB: the peak over the loaded model)",
        "", table(cells), ""])
    print(text)
    B.RESULTS.mkdir(parents=True, exist_ok=True)
    (B.RESULTS / "memory_floor.txt").write_text(text)
    m["malloc_env_memory_children"] = None  # per setting instead:
    payload = {"machine": m, "point": POINT, "malloc_env": SETTINGS, "cells": cells}
    (B.RESULTS / "memory_floor.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
