"""Agreement of two PAGE reports, e.g. one process against the same probe under torchrun.

    python -m benchmarks.compare_reports one_process.json two_ranks.json   # from the repository root

The README's torchrun figures come from this script; the commands and their output are in
benchmarks/results/torchrun_vs_one_process.txt.

Prints the largest relative difference of the scores and of the per-sample energies.
Exits 1 if the modules, sample counts or dominant modules differ.
"""

from __future__ import annotations

import sys

from domlora_kernels import PageScores


def main(a_path: str, b_path: str) -> int:
    a, b = PageScores.from_json(a_path), PageScores.from_json(b_path)
    if list(a.scores) != list(b.scores) or a.num_samples != b.num_samples:
        print(f"different probes: {len(a.scores)} vs {len(b.scores)} modules, {a.num_samples} vs {b.num_samples} samples")
        return 1
    rel = max(abs(a.scores[n] - b.scores[n]) / abs(a.scores[n]) for n in a.scores if a.scores[n] != 0)
    line = (f"{len(a.scores)} modules, {a.num_samples} samples, world_size {b.meta.get('world_size', 1)}: "
            f"max rel diff of scores {rel:.2e}")
    if a.per_sample is not None and b.per_sample is not None:
        ps = max(float(((a.per_sample[n] - b.per_sample[n]).abs() / a.per_sample[n].abs().clamp_min(1e-300)).max())
                 for n in a.scores)
        line += f", of per-sample energies {ps:.2e}"
    print(line)
    print(f"dominant: {a.dominant_module} | {b.dominant_module}")
    return 0 if a.dominant_module == b.dominant_module else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
