"""Instructions, not seconds: the probe against the floor under valgrind's callgrind.

From the repository root:
    python -m benchmarks.instructions --jobs 2        # the committed results/instructions.txt (about 1.5 h here)
    python -m benchmarks.instructions --layers 1 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --batch 2 --tokens 16 --repeats 1 --out /tmp/x.txt          # a quick look (minutes)

Timings on a shared 2-core machine move with the load; the number of instructions a
process executes does not. Each provider (``floor``: the frozen forward and backward with
no probe; ``probe``: ``page_scores`` as shipped; ``probe-expected`` if asked) runs in its
own process under ``valgrind --tool=callgrind --instr-atstart=no``, one torch thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) and ``PYTHONHASHSEED=0``, on the same
random-weight Llama and the same token ids as benchmarks/bench_probe.py's providers. The
process loads torch and the model, prepares the provider and runs it once (warm-up, not
counted), then switches callgrind's instrumentation on, runs the provider ``--calls`` times
(one callgrind dump after each call, so every call has its own count) and switches it off.
The switches are valgrind client requests issued from Python (the amd64 client-request
sequence in an executable page called through ctypes, no compiler needed), so nothing of
torch's import, the model's construction or the warm-up is counted. The counts are the
``totals:`` lines of callgrind's output files (``Ir``: guest instructions executed, every
thread). The whole thing runs ``--repeats`` times, in fresh processes, to show the counts
repeat.

``--layers`` takes a list (default 1,2, same vocabulary): besides the ratio of each model,
the difference between consecutive ones gives what one more decoder layer costs each
provider. That per-layer ratio is the one a deep model tends to: the floor's backward runs
into the embeddings while the probe's stops at the first tapped module, so on a model of one
or two layers the floor does work the probe skips, and the whole-model ratio is low.

Under valgrind the CPU reports no AVX-512 (valgrind 3.19 does not emulate it), so torch runs
its AVX2 kernels there: the counts are of those code paths. ``--time-rounds`` also times the
same workloads natively (interleaved, median), the noisy wall-clock ratio beside the count.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROVIDERS = ("floor", "probe", "probe-expected")
DEFAULT_PROVIDERS = "floor,probe"
CHILD_MARK = "INSTRUCTIONS_CHILD "

# ----------------------------------------------------------------------------- valgrind client requests

# Callgrind's requests (valgrind/callgrind.h): VG_USERREQ_TOOL_BASE('C','T') + enum index.
_CT_BASE = (ord("C") & 0xFF) << 24 | (ord("T") & 0xFF) << 16
REQ_RUNNING_ON_VALGRIND = 0x1001
REQ_DUMP_STATS = _CT_BASE + 0
REQ_ZERO_STATS = _CT_BASE + 1
REQ_DUMP_STATS_AT = _CT_BASE + 3
REQ_START_INSTRUMENTATION = _CT_BASE + 4
REQ_STOP_INSTRUMENTATION = _CT_BASE + 5

# uint64 f(uint64 *args, uint64 default): valgrind.h's VALGRIND_DO_CLIENT_REQUEST_EXPR for
# amd64 as a function. On a real CPU the rotations cancel (3+13+61+51 = 128) and the xchg is
# a no-op, so it returns ``default``; valgrind recognises the sequence and answers the request.
_CLIENT_REQUEST_AMD64 = bytes([
    0x48, 0x89, 0xF8,        # mov %rdi,%rax      args
    0x48, 0x89, 0xF2,        # mov %rsi,%rdx      default
    0x48, 0xC1, 0xC7, 0x03,  # rol $3,%rdi
    0x48, 0xC1, 0xC7, 0x0D,  # rol $13,%rdi
    0x48, 0xC1, 0xC7, 0x3D,  # rol $61,%rdi
    0x48, 0xC1, 0xC7, 0x33,  # rol $51,%rdi
    0x48, 0x87, 0xDB,        # xchg %rbx,%rbx     the request: %rdx = request(%rax)
    0x48, 0x89, 0xD0,        # mov %rdx,%rax
    0xC3,                    # ret
])


class ClientRequests:
    """Valgrind client requests from Python (x86-64 Linux only)."""

    def __init__(self):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"client requests are implemented for x86-64 only, not {platform.machine()}")
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CLIENT_REQUEST_AMD64)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)(addr)
        self._keep = []

    def request(self, code: int, *args: int, default: int = 0) -> int:
        a = (ctypes.c_uint64 * 6)(code, *(list(args) + [0] * (5 - len(args))))
        return int(self._fn(ctypes.addressof(a), default))

    def running_on_valgrind(self) -> int:
        """0 on a real CPU, else the number of valgrinds this runs under."""
        return self.request(REQ_RUNNING_ON_VALGRIND)

    def start(self) -> None:
        self.request(REQ_START_INSTRUMENTATION)

    def stop(self) -> None:
        self.request(REQ_STOP_INSTRUMENTATION)

    def zero(self) -> None:
        self.request(REQ_ZERO_STATS)

    def dump(self, label: str) -> None:
        s = ctypes.create_string_buffer(label.encode())
        self._keep.append(s)
        self.request(REQ_DUMP_STATS_AT, ctypes.addressof(s))


# ----------------------------------------------------------------------------- callgrind output

_TOTALS = re.compile(r"^(totals|summary):\s*(\d+)", re.MULTILINE)
_EVENTS = re.compile(r"^events:\s*(.+)$", re.MULTILINE)


def parse_totals(text: str) -> int:
    """The instruction count (``Ir``, the first event) of one callgrind output file: its
    ``totals:`` line, or its ``summary:`` line where there is no ``totals:``."""
    found = {k: int(v) for k, v in _TOTALS.findall(text)}
    ev = _EVENTS.search(text)
    if ev and ev.group(1).split()[0] != "Ir":
        raise ValueError(f"the first event is {ev.group(1).split()[0]}, not Ir")
    if "totals" in found:
        return found["totals"]
    if "summary" in found:
        return found["summary"]
    raise ValueError("no totals: or summary: line")


def dump_part(path: Path) -> int:
    """The part number of a callgrind dump: ``out.3`` -> 3; the final file ``out`` -> 0 (written last)."""
    m = re.search(r"\.(\d+)$", path.name)
    return int(m.group(1)) if m else 0


def collect(base: Path) -> dict:
    """Per-dump counts of one callgrind run whose ``--callgrind-out-file`` was ``base``:
    ``base.1``, ``base.2``, ... (one per call, in order) and ``base`` (what came after the
    last dump, up to the switch-off: a handful of instructions)."""
    files = sorted(base.parent.glob(base.name + ".*"), key=dump_part) + ([base] if base.exists() else [])
    files = [f for f in files if f == base or re.fullmatch(r"\d+", f.name[len(base.name) + 1:])]
    counts = [parse_totals(f.read_text(errors="replace")) for f in files]
    per_call = counts[:-1] if base.exists() else counts
    tail = counts[-1] if base.exists() else 0
    return {"per_call": per_call, "tail": tail, "total": sum(counts)}


def ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


# ----------------------------------------------------------------------------- the counted process


def child(job: dict) -> dict:
    """Runs under callgrind: warm-up untimed, then ``calls`` counted runs of one provider."""
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from benchmarks import providers as P
    from benchmarks.bench_probe import build_model, make_ids

    cr = ClientRequests()
    on_vg = cr.running_on_valgrind()
    model = build_model(job["spec"])
    ids = make_ids(model, job["batch"], job["tokens"])
    p = P.PROVIDERS[job["provider"]](model, ids, job["rank"])
    p.prepare()
    for _ in range(job["warmup"]):
        p.run()
    gc.collect()
    walls = []
    cr.zero()
    cr.start()
    for i in range(job["calls"]):
        t0 = time.perf_counter()
        p.run()
        cr.dump(f"{job['provider']} call {i + 1}")
        walls.append(time.perf_counter() - t0)
    cr.stop()
    p.teardown()
    return {"provider": job["provider"], "running_on_valgrind": on_vg, "counted_wall_s": walls,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def valgrind_cmd(out_file: Path, job: dict) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
            sys.executable, "-m", "benchmarks.instructions", "--child", json.dumps(job)]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def count(job: dict, workdir: Path, tag: str, log=print) -> dict:
    """One callgrind process for one provider: its counts, wall time and what it reported."""
    out = workdir / f"callgrind.{tag}.out"
    t0 = time.perf_counter()
    r = subprocess.run(valgrind_cmd(out, job), check=False, capture_output=True, text=True, cwd=ROOT, env=child_env())
    wall = time.perf_counter() - t0
    info = None
    for line in r.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            info = json.loads(line[len(CHILD_MARK):])
    if r.returncode != 0 or info is None:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{tag}: valgrind exit {r.returncode}: {tail}")
    if not info["running_on_valgrind"]:
        raise RuntimeError(f"{tag}: the child did not see valgrind (client requests are no-ops)")
    res = collect(out)
    if len(res["per_call"]) != job["calls"]:
        raise RuntimeError(f"{tag}: {len(res['per_call'])} dumps for {job['calls']} calls")
    res.update(provider=job["provider"], process_wall_s=wall, child=info)
    log(f"  {tag}: {res['total']:,} instructions ({', '.join(f'{c:,}' for c in res['per_call'])} per call), "
        f"{wall:.0f} s")
    return res


# ----------------------------------------------------------------------------- native timing (noisy, for contrast)


def native_times(job: dict, names: list[str], rounds: int) -> dict:
    """Wall-clock seconds of one run of each provider, natively, interleaved, one thread."""
    code = (
        "import json,sys,time,torch\n"
        "torch.set_num_threads(1)\n"
        "from benchmarks import providers as P\n"
        "from benchmarks.bench_probe import build_model, make_ids\n"
        "j=json.loads(sys.argv[1]); names=j['names']\n"
        "m=build_model(j['spec']); ids=make_ids(m,j['batch'],j['tokens'])\n"
        "ps={n:P.PROVIDERS[n](m,ids,j['rank']) for n in names}; t={n:[] for n in names}\n"
        "for r in range(j['rounds']+1):\n"
        " k=r%len(names)\n"
        " for n in names[k:]+names[:k]:\n"
        "  p=ps[n]; p.prepare(); t0=time.perf_counter(); p.run(); dt=time.perf_counter()-t0; p.teardown()\n"
        "  (t[n].append(dt) if r else None)\n"
        f"print({CHILD_MARK!r}+json.dumps(t))\n"
    )
    j = dict(job, names=names, rounds=rounds)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(j)], check=False, capture_output=True, text=True, cwd=ROOT,
                       env=child_env())
    for line in r.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"native timing failed: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")


# ----------------------------------------------------------------------------- report


def lscpu_head(n: int = 20) -> str:
    try:
        return "\n".join(subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()[:n])
    except OSError as e:
        return f"(lscpu failed: {e})"


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Totals per provider and repeat, their spread, and the ratios to the floor per repeat."""
    out = {}
    floor = runs.get("floor")
    for n, rs in runs.items():
        totals = [r["total"] for r in rs]
        spread = (max(totals) - min(totals)) / min(totals) if min(totals) else float("nan")
        row = {"totals": totals, "per_call": [r["per_call"] for r in rs], "spread": spread,
               "per_call_mean": statistics.mean(totals) / len(rs[0]["per_call"])}
        if floor:
            row["ratio_to_floor"] = [ratio(a["total"], b["total"]) for a, b in zip(rs, floor)]
        out[n] = row
    return out


def _per_layer_by_repeat(a: dict, b: dict, name: str, dl: int) -> list[float]:
    """Instructions per call one more layer costs ``name``, from repeat i of points ``a`` and ``b``."""
    ca, cb = a["workload"]["calls"], b["workload"]["calls"]
    return [(tb / cb - ta / ca) / dl for ta, tb in zip(a["summary"][name]["totals"], b["summary"][name]["totals"])]


def marginal(points: list[dict]) -> list[dict]:
    """Per added layer, between consecutive points (same vocabulary, batch and tokens): the
    instructions per call each provider adds, and their ratio to the floor's. The embedding,
    the LM head, the loss and the floor's backward into the embeddings (which the probe's
    backward stops short of) are in every point and cancel: what is left is what one more
    decoder layer costs, the part a deep model is made of."""
    out = []
    for a, b in itertools.pairwise(points):
        dl = b["workload"]["spec"]["layers"] - a["workload"]["spec"]["layers"]
        row = {"layers": [a["workload"]["spec"]["layers"], b["workload"]["spec"]["layers"]], "per_layer": {}}
        for n in b["summary"]:
            if n in a["summary"]:
                row["per_layer"][n] = (b["summary"][n]["per_call_mean"] - a["summary"][n]["per_call_mean"]) / dl
        if "floor" in row["per_layer"]:
            f = row["per_layer"]["floor"]
            row["ratio_to_floor"] = {n: ratio(v, f) for n, v in row["per_layer"].items()}
            # the same from each repeat alone (repeat i of both points)
            fl = _per_layer_by_repeat(a, b, "floor", dl)
            row["ratio_to_floor_per_repeat"] = {n: [ratio(x, y) for x, y in zip(_per_layer_by_repeat(a, b, n, dl), fl)]
                                                for n in row["per_layer"]}
        out.append(row)
    return out


def _point_lines(pt: dict, repeats: int) -> list[str]:
    w, s = pt["workload"], pt["summary"]
    lines = [
        f"workload: random-weight Llama {json.dumps(w['spec'])}",
        f"  B={w['batch']} T={w['tokens']} r={w['rank']}, {w['candidates']} candidate modules, "
        f"{w['candidate_params']:,} candidate weights, {w['params']:,} parameters",
        f"  per process: {w['warmup']} warm-up call (not counted), then {w['calls']} counted calls of the provider's "
        f"run(); one torch thread, PYTHONHASHSEED=0; {repeats} repeats in fresh processes",
        "",
        f"{'provider':<16}" + "".join(f"{'repeat ' + str(i + 1) + ' total':>22}" for i in range(repeats))
        + f"{'spread':>10}{'per call':>16}{'x floor':>18}",
    ]
    for n, row in s.items():
        rat = row.get("ratio_to_floor")
        rtxt = " / ".join(f"{x:.4f}" for x in rat) if rat else "-"
        lines.append(f"{n:<16}" + "".join(f"{t:>22,}" for t in row["totals"])
                     + f"{row['spread']:>10.1e}{row['per_call_mean']:>16,.0f}{rtxt:>18}")
    lines.append("per call (each counted call has its own callgrind dump):")
    for n, row in s.items():
        for i, pc in enumerate(row["per_call"]):
            lines.append(f"  {n:<16} repeat {i + 1}: " + ", ".join(f"{c:,}" for c in pc))
    if "probe" in s and "floor" in s:
        r = s["probe"]["ratio_to_floor"]
        lines.append(f"probe / floor instructions: {' and '.join(f'{x:.4f}' for x in r)} "
                     f"(the repeats differ by {abs(max(r) - min(r)):.1e})")
        if "probe-expected" in s:
            r2 = s["probe-expected"]["ratio_to_floor"]
            lines.append(f"probe-expected / floor instructions: {' and '.join(f'{x:.4f}' for x in r2)}")
    nt = pt.get("native")
    if nt:
        med = {n: statistics.median(v) for n, v in nt["times_s"].items()}
        lines.append(f"for contrast, native wall clock of the same workload (one thread, {nt['rounds']} interleaved rounds "
                     f"after one warm-up, median; load average {' '.join(f'{x:.2f}' for x in nt['loadavg'])}):")
        for n, v in med.items():
            rr = f"  {v / med['floor']:.3f} x floor" if "floor" in med else ""
            lines.append(f"  {n:<16}{v:.4f} s{rr}   (rounds: {', '.join(f'{x:.4f}' for x in nt['times_s'][n])})")
    return lines


def text_report(payload: dict) -> str:
    lines = [
        f"command: {payload['command']}",
        f"date: {payload['date']}",
        f"torch {payload['torch']}, python {payload['python']}, {payload['valgrind']}; torch's CPU capability under "
        f"valgrind: {payload['cpu_capability_under_valgrind']} (natively: {payload['cpu_capability_native']})",
        "counted: Ir (instructions executed, every thread) of the counted calls, from callgrind's totals: lines; "
        "torch's import, the model, the warm-up call are not counted",
        "",
        "lscpu | head -20:",
        payload["lscpu"],
    ]
    for pt in payload["points"]:
        lines += ["", *_point_lines(pt, payload["repeats"])]
    for m in payload.get("marginal", []):
        lines += ["", f"per added decoder layer ({m['layers'][0]} -> {m['layers'][1]} layers, mean instructions per call; "
                      f"embedding, head, loss and the floor's backward into the embeddings cancel):"]
        for n, v in m["per_layer"].items():
            rr = ""
            if "ratio_to_floor" in m:
                reps = m.get("ratio_to_floor_per_repeat", {}).get(n, [])
                rr = f"  {m['ratio_to_floor'][n]:.4f} x floor" + (
                    f"  (repeat by repeat: {' / '.join(f'{x:.4f}' for x in reps)})" if len(reps) > 1 else "")
            lines.append(f"  {n:<16}{v:>16,.0f}{rr}")
    lines += ["", f"valgrind processes (wall, on the shared machine): "
                  f"{', '.join(f'{k} {v:.0f} s' for k, v in payload['process_wall_s'].items())}; total {payload['wall_s']:.0f} s "
                  f"(load average before {' '.join(f'{x:.2f}' for x in payload['loadavg_before'])}, "
                  f"after {' '.join(f'{x:.2f}' for x in payload['loadavg_after'])})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=576, help="default 576 (SmolLM2-135M's)")
    ap.add_argument("--intermediate", type=int, default=1536, help="default 1536 (SmolLM2-135M's)")
    ap.add_argument("--layers", default="1,2",
                    help="decoder layers, a comma-separated list: one workload each, and the per-layer difference "
                         "between consecutive ones (default 1,2; SmolLM2-135M has 30)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=None,
                    help="default: SmolLM2's 49152 x (fewest layers)/30, to a multiple of 64 (1664 for one layer): the "
                         "LM head's share of one layer's work as in SmolLM2; the same for every --layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3, help="counted calls per process (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted calls before them (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per provider and workload (default 2)")
    ap.add_argument("--providers", default=DEFAULT_PROVIDERS, help=f"comma-separated, of {', '.join(PROVIDERS)} "
                                                                   f"(default {DEFAULT_PROVIDERS})")
    ap.add_argument("--jobs", type=int, default=1, help="valgrind processes at once (default 1)")
    ap.add_argument("--time-rounds", type=int, default=7,
                    help="native timed rounds for the wall-clock contrast (0: none; default 7)")
    ap.add_argument("--out", default=str(RESULTS / "instructions.txt"), help="text report; the JSON twin beside it")
    ap.add_argument("--keep", default=None,
                    help="keep callgrind's output files in this folder (for callgrind_annotate); default: a temporary one")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="count nothing: write the text report (and the JSON) of a saved run again, to --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child or args.render:
        return args
    names = [n for n in args.providers.split(",") if n]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        ap.error(f"unknown provider {', '.join(bad) or '(none)'}; choose from {', '.join(PROVIDERS)}")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--layers takes a comma-separated list of integers, not {args.layers!r}")
    if not layers or min(layers) < 1 or len(set(layers)) != len(layers):
        ap.error("--layers needs distinct layer counts >= 1")
    if min(args.calls, args.repeats, args.jobs, args.batch, args.rank) < 1 or args.tokens < 2:
        ap.error("--calls, --repeats, --jobs, --batch, --rank must be >= 1 and --tokens >= 2")
    if args.warmup < 0 or args.time_rounds < 0:
        ap.error("--warmup and --time-rounds must be >= 0")
    args.layer_list = sorted(layers)
    if args.vocab is None:
        args.vocab = default_vocab(args.layer_list[0])
    args.provider_list = names
    return args


def default_vocab(layers: int) -> int:
    """SmolLM2's vocabulary scaled with the layers kept, to a multiple of 64."""
    return max(64, round(49152 * layers / 30 / 64) * 64)


def spec_of(args, layers: int) -> dict:
    from benchmarks.bench_probe import llama

    return llama(args.hidden, args.intermediate, layers, args.heads, args.kv_heads, args.vocab)


def workload_of(args, layers: int) -> dict:
    from benchmarks.bench_probe import _MODELS, build_model, candidate_params
    from domlora_kernels.probe.candidates import find_candidates

    spec = spec_of(args, layers)
    model = build_model(spec)
    w = {"spec": spec, "batch": args.batch, "tokens": args.tokens, "rank": args.rank, "calls": args.calls,
         "warmup": args.warmup, "candidates": len(find_candidates(model)),
         "candidate_params": candidate_params(model), "params": sum(p.numel() for p in model.parameters())}
    _MODELS.clear()
    return w


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.stdout.reconfigure(line_buffering=True)
        print(CHILD_MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        payload["marginal"] = marginal(payload["points"])
        write_report(payload, Path(args.out))
        return 0
    if not shutil.which("valgrind"):
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    import torch

    sys.stdout.reconfigure(line_buffering=True)
    workloads = {L: workload_of(args, L) for L in args.layer_list}
    jobs = {L: {k: w[k] for k in ("spec", "batch", "tokens", "rank", "calls", "warmup")} for L, w in workloads.items()}
    vg = subprocess.run(["valgrind", "--version"], check=False, capture_output=True, text=True).stdout.strip()
    load0, t0 = os.getloadavg(), time.perf_counter()
    for w in workloads.values():
        print(f"workload {json.dumps(w)}")
    print(f"{args.repeats} repeats of {', '.join(args.provider_list)} under callgrind, {args.jobs} at a time")
    tasks = [(rep, L, n) for rep in range(args.repeats) for L in args.layer_list for n in args.provider_list]
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True, exist_ok=True)
            stale = list(tmp.glob("callgrind.*"))
            if stale:
                print(f"--keep {tmp}: holds {len(stale)} callgrind files already; empty it first", file=sys.stderr)
                return 2
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="instructions_"))
        with ThreadPoolExecutor(max_workers=args.jobs) as ex:
            futs = {(rep, L, n): ex.submit(count, dict(jobs[L], provider=n), Path(tmp), f"L{L}.{n}.{rep + 1}")
                    for rep, L, n in tasks}
            results = {key: f.result() for key, f in futs.items()}
    points = []
    for L in args.layer_list:
        runs = {n: [results[(rep, L, n)] for rep in range(args.repeats)] for n in args.provider_list}
        native = None
        if args.time_rounds:
            native = {"rounds": args.time_rounds, "loadavg": os.getloadavg(),
                      "times_s": native_times(jobs[L], args.provider_list, args.time_rounds)}
        points.append({
            "workload": workloads[L],
            "counts": {n: [{k: r[k] for k in ("total", "per_call", "tail", "process_wall_s")}
                           | {"counted_wall_s": r["child"]["counted_wall_s"]} for r in rs] for n, rs in runs.items()},
            "summary": summarise(runs), "native": native,
        })
    first = results[tasks[0]]["child"]
    payload = {
        "command": " ".join(["python", "-m", "benchmarks.instructions", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "lscpu": lscpu_head(), "torch": torch.__version__,
        "python": platform.python_version(), "valgrind": vg,
        "cpu_capability_under_valgrind": first["cpu_capability"],
        "cpu_capability_native": torch.backends.cpu.get_cpu_capability(),
        "repeats": args.repeats, "jobs": args.jobs, "points": points, "marginal": marginal(points),
        "process_wall_s": {tag: r["process_wall_s"] for tag, r in
                           ((f"L{L}.{n}.{rep + 1}", results[(rep, L, n)]) for rep, L, n in tasks)},
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0,
    }
    write_report(payload, Path(args.out))
    return 0


def write_report(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = text_report(payload)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json').name}")


if __name__ == "__main__":
    sys.exit(main())
