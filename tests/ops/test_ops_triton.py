"""Triton kernels against the pure-torch reference.

On a CPU-only machine the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py before anything imports triton). On a CUDA machine the same tests run
the compiled kernels on the GPU, plus the ``gpu``-marked ones on real-model sizes.

Every kernel call here runs with ``DOMLORA_KERNELS_POISON=1``: the launchers fill their
scratch with NaN, so an element no program wrote turns the result into NaN and fails the
comparison.

The oracle is the reference on the same (rounded) inputs in float64, so the errors below
are the kernels' own, not the difference between two float32 computations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from domlora_kernels.ops import weight_grad_energy, projected_energy  # noqa: E402
from domlora_kernels.ops.naive import weight_grad_energy_ref, projected_energy_ref  # noqa: E402
from domlora_kernels.testing import KERNEL_DTYPES, rel_err, uses_gram  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error of the whole result, ||out - ref|| / ||ref||, ref in float64 on the same
# rounded inputs. Worst measured through the interpreter on this module's shapes: ~1.5e-7
# for every dtype (the interpreter multiplies in float32; products of 16-bit inputs are
# exact in float32, so only float32 summation order differs). The 16-bit entries leave
# room for tensor-core accumulation on a GPU (not measured yet: benchmarks/gpu_check.py
# records it); they still catch a bfloat16 accumulator (~1e-2) or a TF32 dot (~1e-3 on the
# float32 entry).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in KERNEL_DTYPES]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("DOMLORA_KERNELS_POISON", "1")


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def cu_of(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def check_projected(u, v, cu=None):
    out = projected_energy(u, v, cu, backend="triton")
    ref = projected_energy_ref(u.double(), v.double(), cu)
    assert out.dtype == torch.float32 and out.device == u.device
    assert out.shape == ref.shape
    assert not out.isnan().any(), "an element was left unwritten (NaN poison survived)"
    err = rel_err(out, ref)
    assert err < TOL[u.dtype], f"relative error {err:.2e} over tolerance {TOL[u.dtype]:.0e}"
    return err


def check_gradient(d, x, cu=None):
    out = weight_grad_energy(d, x, cu, backend="triton")
    ref = weight_grad_energy_ref(d.double(), x.double(), cu)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not out.isnan().any(), "an element was left unwritten (NaN poison survived)"
    err = rel_err(out, ref)
    assert err < TOL[d.dtype], f"relative error {err:.2e} over tolerance {TOL[d.dtype]:.0e}"
    return err


# --------------------------------------------------------------------------- projected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,M,R",
    [
        pytest.param(3, 63, 1000, 3, id="B3-T63-M1000-R3"),
        pytest.param(2, 1, 1000, 3, id="B2-T1-M1000-R3"),
        pytest.param(2, 70, 33, 17, id="B2-T70-M33-R17"),
    ],
)
def test_projected_energy_padded(B, T, M, R, dtype):
    check_projected(randn(B, T, M, dtype=dtype, seed=T), randn(B, T, R, dtype=dtype, seed=T + 1))


@pytest.mark.parametrize(
    "B,T,M,R",
    [
        pytest.param(2, 5, 40, 64, id="B2-T5-M40-R64"),
        pytest.param(1, 7, 30, 128, id="B1-T7-M30-R128"),
        pytest.param(2, 3, 20, 200, id="B2-T3-M20-R200"),  # four R tiles
    ],
)
def test_projected_energy_large_rank(B, T, M, R):
    check_projected(randn(B, T, M, dtype=torch.bfloat16, seed=R), randn(B, T, R, dtype=torch.bfloat16, seed=R + 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lens,M,R",
    [
        pytest.param([0, 1, 17, 0, 64, 3, 130], 1000, 3, id="L0-1-17-0-64-3-130-M1000-R3"),
        pytest.param([1, 0, 9, 66], 50, 64, id="L1-0-9-66-M50-R64"),
    ],
)
def test_projected_energy_packed(lens, M, R, dtype):
    n = sum(lens)
    check_projected(randn(n, M, dtype=dtype, seed=n), randn(n, R, dtype=dtype, seed=n + 1), cu_of(lens))


def test_projected_energy_strided_views():
    # u: a transposed view (stride 1 along T, not M); v: every other column of a wider one.
    B, T, M, R = 3, 63, 100, 3
    u = randn(B, M, T, dtype=torch.bfloat16, seed=1).transpose(1, 2)
    v = randn(B, T, 2 * R, dtype=torch.bfloat16, seed=2)[..., ::2]
    assert not u.is_contiguous() and not v.is_contiguous()
    check_projected(u, v)
    # packed: u the transpose of an [M, N] matrix, v a column slice with a row step.
    lens = [5, 0, 1, 30]
    n = sum(lens)
    u = randn(M, n, dtype=torch.float16, seed=3).T
    v = randn(2 * n, 7, dtype=torch.float16, seed=4)[::2, 1:4]
    assert not u.is_contiguous() and not v.is_contiguous()
    check_projected(u, v, cu_of(lens))


class LaunchSpy:
    """Stands in for a kernel object; records the tensors each launch received."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append([a for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_strided_inputs_reach_the_kernels_uncopied(monkeypatch):
    # The kernels get the caller's storage and strides, not a .contiguous() copy; the direct
    # form of weight_grad_energy runs the projected kernel (one kernel per reduction).
    from domlora_kernels.ops import weight_grad_energy_triton as ge
    from domlora_kernels.ops import projected_energy_triton as pe

    u = randn(2, 200, 10, dtype=torch.bfloat16, seed=1).transpose(1, 2)  # [2, 10, 200]
    v = randn(2, 10, 8, dtype=torch.bfloat16, seed=2)[..., 2:5]
    spies = {"pe": LaunchSpy(pe.projected_energy_kernel), "gram": LaunchSpy(ge.weight_grad_energy_gram_kernel)}
    monkeypatch.setattr(pe, "projected_energy_kernel", spies["pe"])
    monkeypatch.setattr(ge, "weight_grad_energy_gram_kernel", spies["gram"])
    check_projected(u, v)
    assert not uses_gram(10, 200, 3) and uses_gram(10, 200, 200)
    check_gradient(u, v)  # direct: the projected kernel
    check_gradient(u, u)  # Gram
    assert [len(s.launches) for s in spies.values()] == [2, 1]
    for a, b, *_ in spies["pe"].launches + spies["gram"].launches:
        assert a.data_ptr() == u.data_ptr() and a.stride() == u.stride()
        assert b.data_ptr() in (v.data_ptr(), u.data_ptr())


def test_huge_strides_are_copied_not_overflowed(monkeypatch):
    # Tiles are addressed with int32 offsets from an int64 base; a view whose tile offsets
    # would pass 2^31 is copied first. Lowering the limit stands in for a >8 GiB buffer.
    from domlora_kernels.ops import projected_energy_triton as pe

    spy = LaunchSpy(pe.projected_energy_kernel)
    monkeypatch.setattr(pe, "projected_energy_kernel", spy)
    monkeypatch.setattr(pe, "fits_int32_offsets", lambda t, rows, cols: t.is_contiguous())
    u = randn(2, 40, 63, dtype=torch.float16, seed=3).transpose(1, 2)
    v = randn(2, 63, 5, dtype=torch.float16, seed=4)
    check_projected(u, v)
    assert spy.launches[0][0].is_contiguous() and spy.launches[0][0].data_ptr() != u.data_ptr()


def test_projected_energy_mixed_dtypes():
    # The probe may keep P = X A^T in float32 next to a bfloat16 D.
    u = randn(2, 63, 200, dtype=torch.bfloat16, seed=5)
    v = randn(2, 63, 8, dtype=torch.float32, seed=6)
    out = projected_energy(u, v, backend="triton")
    assert rel_err(out, projected_energy_ref(u.double(), v.double())) < 1e-5


@pytest.mark.parametrize(
    "u_shape,v_shape,lens",
    [
        pytest.param((0, 5, 8), (0, 5, 3), None, id="B0"),
        pytest.param((2, 0, 8), (2, 0, 3), None, id="T0"),
        pytest.param((0, 8), (0, 3), [], id="S0"),
        pytest.param((0, 8), (0, 3), [0, 0], id="all-empty-segments"),
    ],
)
def test_projected_energy_empty(u_shape, v_shape, lens):
    u = randn(*u_shape, dtype=torch.float32, seed=0)
    v = randn(*v_shape, dtype=torch.float32, seed=0)
    cu = None if lens is None else cu_of(lens)
    out = projected_energy(u, v, cu, backend="triton")
    assert out.dtype == torch.float32
    assert torch.equal(out.cpu(), projected_energy_ref(u, v, cu).cpu())


# --------------------------------------------------------------------------- split over tokens


def split_vs_one_pass(u, v, cu, chunk):
    """The split launch against the float64 reference and the one-pass launch, and itself
    run again (bitwise). Returns the split result."""
    from domlora_kernels.ops.projected_energy_triton import projected_energy_triton

    one = projected_energy_triton(u, v, cu)
    split = projected_energy_triton(u, v, cu, chunk=chunk)
    ref = projected_energy_ref(u.double(), v.double(), cu)
    assert split.dtype == torch.float32 and split.shape == ref.shape
    assert not split.isnan().any(), "an element was left unwritten (NaN poison survived)"
    assert rel_err(split, ref) < TOL[u.dtype], f"split: relative error {rel_err(split, ref):.2e}"
    assert rel_err(split, one) < TOL[u.dtype], "split and one pass disagree"
    assert torch.equal(projected_energy_triton(u, v, cu, chunk=chunk), split), "split is not bitwise reproducible"
    return split


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,M,R,chunk",
    [
        pytest.param(2, 1, 40, 3, 1, id="B2-T1-M40-R3-chunk1"),
        pytest.param(3, 63, 100, 5, 16, id="B3-T63-M100-R5-chunk16"),  # 4 chunks, last of 15
        pytest.param(1, 45, 33, 70, 7, id="B1-T45-M33-R70-chunk7"),  # 7 chunks, 2 R tiles
    ],
)
def test_split_padded(B, T, M, R, chunk, dtype):
    split_vs_one_pass(randn(B, T, M, dtype=dtype, seed=T), randn(B, T, R, dtype=dtype, seed=T + 1), None, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_varlen_with_empty_segments(dtype):
    # Chunks of 16 tokens: the 130-token segment has 9, the empty and short ones leave
    # chunks past their end, which must write zero blocks.
    lens = [0, 1, 17, 0, 64, 3, 130, 0]
    n = sum(lens)
    out = split_vs_one_pass(randn(n, 50, dtype=dtype, seed=5), randn(n, 8, dtype=dtype, seed=6), cu_of(lens), 16)
    assert (out[torch.tensor(lens, device=DEVICE) == 0] == 0).all()


def test_split_mixed_dtypes():
    u = randn(2, 63, 200, dtype=torch.bfloat16, seed=7)
    v = randn(2, 63, 8, dtype=torch.float32, seed=8)
    split_vs_one_pass(u, v, None, 32)


def test_split_chunk_rule():
    from domlora_kernels.ops.projected_energy_triton import MIN_CHUNK_TOKENS, split_chunk

    assert split_chunk(8192, 64, 64) is None  # enough programs already: one pass
    assert split_chunk(2 * MIN_CHUNK_TOKENS - 1, 5, 64) is None  # too short to split
    chunk = split_chunk(8192, 5, 64)  # B=1, T=8192, M=576: 5 programs
    n_c = -(-8192 // chunk)
    assert chunk >= MIN_CHUNK_TOKENS and chunk % 64 == 0 and 5 * n_c >= 64 and n_c * chunk >= 8192
    assert -(-8192 // split_chunk(8192, 1, 10**6)) == 8192 // MIN_CHUNK_TOKENS  # capped by chunk size


def test_ops_splits_when_one_pass_has_few_programs(monkeypatch):
    # ops.projected_energy(backend="triton") takes the split launch when one pass would
    # have fewer than AUTO_MIN_PROGRAMS programs and the segments are long enough.
    import domlora_kernels.ops as ops
    from domlora_kernels.ops import projected_energy_triton as pe

    spy = LaunchSpy(pe.projected_energy_kernel)
    monkeypatch.setattr(pe, "projected_energy_kernel", spy)
    monkeypatch.setattr(pe, "MIN_CHUNK_TOKENS", 16)
    monkeypatch.setattr(ops, "AUTO_MIN_PROGRAMS", 4)
    lens = [70, 0, 5]
    u = randn(sum(lens), 20, dtype=torch.float16, seed=9)
    v = randn(sum(lens), 3, dtype=torch.float16, seed=10)
    check_projected(u, v, cu_of(lens))
    out = spy.launches[0][-1]
    assert out.dim() == 4 and out.shape[:2] == (3, 2), "expected 2 chunks of 64 tokens per segment"
    monkeypatch.setattr(ops, "AUTO_MIN_PROGRAMS", 3)  # one pass has 3 programs: enough
    check_projected(u, v, cu_of(lens))
    assert spy.launches[1][-1].shape == (3, 1)


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,M,N,form",
    [
        pytest.param(3, 63, 100, 70, "direct", id="B3-T63-M100-N70-direct"),
        pytest.param(2, 130, 600, 600, "gram", id="B2-T130-M600-N600-gram"),  # 5 x 5 T tiles
        pytest.param(2, 1, 1000, 3, "gram", id="B2-T1-M1000-N3-gram"),
        pytest.param(1, 5, 3, 1000, "direct", id="B1-T5-M3-N1000-direct"),
    ],
)
def test_weight_grad_energy_padded(B, T, M, N, form, dtype):
    assert uses_gram(T, M, N) == (form == "gram")  # the id says which kernel runs
    check_gradient(randn(B, T, M, dtype=dtype, seed=M), randn(B, T, N, dtype=dtype, seed=N + 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lens,M,N",
    [
        # M = N = 64: Gram below T = 32, direct from 32 on.
        pytest.param([0, 1, 5, 40, 31, 0, 33, 100], 64, 64, id="L0-1-5-40-31-0-33-100-M64-N64"),
        # M = 300, N = 200: Gram below T = 120, over 3 x 3 and 4 x 4 token tiles for 70 and 119.
        pytest.param([70, 0, 1, 119, 121, 3], 300, 200, id="L70-0-1-119-121-3-M300-N200"),
    ],
)
def test_weight_grad_energy_packed_mixes_forms(lens, M, N, dtype):
    assert {uses_gram(t, M, N) for t in lens if t} == {True, False}
    n = sum(lens)
    check_gradient(randn(n, M, dtype=dtype, seed=21), randn(n, N, dtype=dtype, seed=22), cu_of(lens))


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_weight_grad_energy_strided_views(form):
    B, T = 2, 40
    M, N = (50, 30) if form == "direct" else (300, 200)
    assert uses_gram(T, M, N) == (form == "gram")
    d = randn(B, M, T, dtype=torch.bfloat16, seed=31).transpose(1, 2)
    x = randn(B, T, 3 * N, dtype=torch.bfloat16, seed=32)[..., 1::3]
    assert not d.is_contiguous() and not x.is_contiguous()
    check_gradient(d, x)


@pytest.mark.parametrize(
    "d_shape,x_shape,lens",
    [
        pytest.param((0, 5, 8), (0, 5, 3), None, id="B0"),
        pytest.param((2, 0, 8), (2, 0, 3), None, id="T0"),
        pytest.param((0, 8), (0, 3), [], id="S0"),
        pytest.param((0, 8), (0, 3), [0, 0], id="all-empty-segments"),
    ],
)
def test_weight_grad_energy_empty(d_shape, x_shape, lens):
    d = randn(*d_shape, dtype=torch.float32, seed=0)
    x = randn(*x_shape, dtype=torch.float32, seed=0)
    cu = None if lens is None else cu_of(lens)
    out = weight_grad_energy(d, x, cu, backend="triton")
    assert out.dtype == torch.float32
    assert torch.equal(out.cpu(), weight_grad_energy_ref(d, x, cu).cpu())


# --------------------------------------------------------------------------- harness


def test_poison_hook_fills_scratch_with_nan():
    # The guarantee every test above leans on: with the flag, scratch starts as NaN.
    from domlora_kernels.ops import triton_common

    assert triton_common.partials((3, 4), torch.device(DEVICE)).isnan().all()
    assert triton_common.partials((5,), torch.device(DEVICE)).isnan().all()


# --------------------------------------------------------------------------- backend errors


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u, v = torch.randn(2, 5, 7), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        projected_energy(u, v, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        weight_grad_energy(u, v, backend="triton")


def test_unknown_backend_is_refused():
    u, v = torch.randn(2, 5, 7), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, torch, triton"):
        projected_energy(u, v, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        weight_grad_energy(u, v, backend="Triton")


def test_float64_needs_torch_backend():
    u = torch.randn(2, 5, 7, dtype=torch.float64, device=DEVICE)
    v = torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        projected_energy(u, v, backend="triton")
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        weight_grad_energy(u, v.float(), backend="triton")
    out = projected_energy(u, v)  # auto: the torch path keeps float64
    assert out.dtype == torch.float64
    assert torch.allclose(out, projected_energy_ref(u, v), rtol=1e-12)


def test_integer_inputs_refused_by_triton():
    u = torch.ones(2, 5, 7, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        projected_energy(u, u[..., :3], backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "cu,match",
    [
        pytest.param([1, 4, 10], "start at 0", id="not-from-0"),
        pytest.param([0, 6, 4, 10], "non-decreasing", id="decreasing"),
        pytest.param([0, 4, 9], "end at the number of rows", id="short"),
        pytest.param([0, 4, 11], "end at the number of rows", id="past-end"),
    ],
)
def test_bad_cu_seqlens(cu, match, backend):
    u, v = torch.randn(10, 7, device=DEVICE), torch.randn(10, 3, device=DEVICE)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        projected_energy(u, v, cu_t, backend=backend)
    with pytest.raises(ValueError, match=match):
        weight_grad_energy(u, v, cu_t, backend=backend)


def test_cu_seqlens_wrong_type_or_rank():
    u, v = torch.randn(10, 7), torch.randn(10, 3)
    with pytest.raises(ValueError, match="1-D int32"):
        projected_energy(u, v, torch.tensor([0.0, 10.0]), backend="triton")
    with pytest.raises(ValueError, match="1-D int32"):
        projected_energy(u, v, torch.tensor([[0, 10]], dtype=torch.int32), backend="triton")


@pytest.mark.parametrize(
    "u_shape,v_shape,packed",
    [
        pytest.param((2, 5, 7), (2, 6, 3), False, id="T-differs"),
        pytest.param((2, 5, 7), (3, 5, 3), False, id="B-differs"),
        pytest.param((10, 7), (10, 3), False, id="2D-without-cu"),
        pytest.param((2, 5, 7), (2, 5, 3), True, id="3D-with-cu"),
        pytest.param((10, 7), (9, 3), True, id="rows-differ"),
    ],
)
def test_mismatched_shapes(u_shape, v_shape, packed):
    u, v = torch.randn(*u_shape), torch.randn(*v_shape)
    cu = torch.tensor([0, 10], dtype=torch.int32) if packed else None
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="must"):
            projected_energy(u, v, cu, backend=backend)
        with pytest.raises(ValueError, match="must"):
            weight_grad_energy(u, v, cu, backend=backend)


def test_import_is_lazy_and_stale_kernels_are_reported(tmp_path):
    # A fresh process: `import domlora_kernels.ops` must not import triton; and a kernel
    # compiled before TRITON_INTERPRET=1 was set must give the clear error, not a crash.
    script = tmp_path / "probe_import.py"
    script.write_text(
        "import os, sys, torch\n"
        "import domlora_kernels.ops as ops\n"
        "assert 'triton' not in sys.modules, 'import domlora_kernels.ops imported triton'\n"
        "import domlora_kernels.ops.projected_energy_triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    ops.projected_energy(torch.randn(1, 2, 3), torch.randn(1, 2, 2), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'before the first' in str(e), e\n"
        "    print('OK')\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr



def test_triton_imported_before_interpret_flag_is_reported(tmp_path):
    # peft/transformers may import triton (through torch._dynamo) before a user sets
    # TRITON_INTERPRET=1; triton.language's own helpers are then GPU-only, and the probe must
    # say so instead of crashing inside the interpreter.
    script = tmp_path / "late_flag.py"
    script.write_text(
        "import os, torch\n"
        "import triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import domlora_kernels.ops as ops\n"
        "try:\n"
        "    ops.projected_energy(torch.randn(1, 2, 3), torch.randn(1, 2, 2), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'first imported' in str(e), e\n"
        "    print('OK')\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr

# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,T,M,R",
    [
        pytest.param(4, 2048, 4096, 16, id="B4-T2048-M4096-R16"),
        pytest.param(2, 1000, 14336, 64, id="B2-T1000-M14336-R64"),
        pytest.param(1, 8192, 576, 8, id="B1-T8192-M576-R8"),
        pytest.param(3, 333, 1000, 128, id="B3-T333-M1000-R128"),
    ],
)
def test_gpu_projected_energy_bf16(B, T, M, R):
    check_projected(randn(B, T, M, dtype=torch.bfloat16, seed=T), randn(B, T, R, dtype=torch.bfloat16, seed=R))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_projected_energy_packed(dtype):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(0, 4096, (9,), generator=g).tolist() + [0, 1]
    n = sum(lens)
    check_projected(randn(n, 4096, dtype=dtype, seed=1), randn(n, 32, dtype=dtype, seed=2), cu_of(lens))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,T,M,N,form",
    [
        pytest.param(2, 512, 4096, 4096, "gram", id="B2-T512-M4096-N4096-gram"),
        pytest.param(1, 4096, 576, 576, "direct", id="B1-T4096-M576-N576-direct"),
        pytest.param(2, 300, 1000, 700, "gram", id="B2-T300-M1000-N700-gram"),
        pytest.param(2, 700, 1000, 700, "direct", id="B2-T700-M1000-N700-direct"),
    ],
)
def test_gpu_weight_grad_energy_bf16(B, T, M, N, form):
    assert uses_gram(T, M, N) == (form == "gram")
    check_gradient(randn(B, T, M, dtype=torch.bfloat16, seed=T), randn(B, T, N, dtype=torch.bfloat16, seed=N))


@pytest.mark.gpu
def test_gpu_float32_is_not_tf32():
    # TF32 would put ~1e-3 relative error here; the kernels ask for "ieee".
    check_projected(randn(2, 2048, 2048, dtype=torch.float32, seed=1), randn(2, 2048, 64, dtype=torch.float32, seed=2))
    check_gradient(randn(2, 256, 1024, dtype=torch.float32, seed=3), randn(2, 256, 1024, dtype=torch.float32, seed=4))


@pytest.mark.gpu
def test_gpu_deterministic():
    u = randn(4, 4096, 4096, dtype=torch.bfloat16, seed=1)
    v = randn(4, 4096, 16, dtype=torch.bfloat16, seed=2)
    first = projected_energy(u, v, backend="triton")
    for _ in range(3):
        assert torch.equal(projected_energy(u, v, backend="triton"), first)
    d = randn(2, 512, 2048, dtype=torch.bfloat16, seed=3)
    x = randn(2, 512, 2048, dtype=torch.bfloat16, seed=4)
    first = weight_grad_energy(d, x, backend="triton")
    assert torch.equal(weight_grad_energy(d, x, backend="triton"), first)


@pytest.mark.gpu
def test_gpu_auto_follows_threshold(monkeypatch):
    import domlora_kernels.ops as ops

    u = randn(2, 300, 1000, dtype=torch.bfloat16, seed=1)
    v = randn(2, 300, 8, dtype=torch.bfloat16, seed=2)
    monkeypatch.setattr(ops, "AUTO_MIN_PROGRAMS", 0)
    assert torch.equal(projected_energy(u, v), projected_energy(u, v, backend="triton"))
    monkeypatch.setattr(ops, "AUTO_MIN_PROGRAMS", 10**9)
    assert torch.equal(projected_energy(u, v), projected_energy(u, v, backend="torch"))


@pytest.mark.gpu
def test_gpu_inputs_on_another_device_than_the_current_one():
    # Triton launches on the current CUDA device; the ops switch to the inputs' device.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    u = randn(2, 300, 1000, dtype=torch.bfloat16, seed=1).to("cuda:1")
    v = randn(2, 300, 8, dtype=torch.bfloat16, seed=2).to("cuda:1")
    with torch.cuda.device(0):
        out = projected_energy(u, v, backend="triton")
        g = weight_grad_energy(u, v, backend="triton")
    assert out.device == u.device and g.device == u.device
    assert rel_err(out, projected_energy_ref(u.double(), v.double())) < TOL[torch.bfloat16]
    assert rel_err(g, weight_grad_energy_ref(u.double(), v.double())) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_split_equals_one_pass():
    from domlora_kernels.ops.projected_energy_triton import projected_energy_triton, split_chunk

    u = randn(1, 8192, 576, dtype=torch.bfloat16, seed=1)
    v = randn(1, 8192, 16, dtype=torch.bfloat16, seed=2)
    chunk = split_chunk(8192, 9, 64)
    assert chunk is not None
    split_vs_one_pass(u, v, None, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_projected_energy_groups_equal_torch(dtype):
    u = randn(2, 9, 33, dtype=dtype, seed=11)
    v = randn(2, 9, 8, dtype=dtype, seed=12)
    got = projected_energy(u, v, backend="triton", groups=2)
    want = projected_energy(u, v, backend="torch", groups=2)
    assert got.shape == (2, 2)
    assert rel_err(got, want) < TOL[dtype]
