"""GPU attention backends (torch-flash, flash-attn, te) against a float64 reference.

The GPU tests skip without CUDA and skip a backend whose package is missing. The CPU test checks that every GPU
backend refuses CPU tensors, and a missing package, with :class:`BackendUnavailable` and a reason.
"""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_fcp.kernels.base import BackendUnavailable, VarlenCall
from megatron_fcp.kernels.flash_attn import FlashAttnBackend
from megatron_fcp.kernels.te import TransformerEngineBackend
from megatron_fcp.kernels.torch_flash import TorchFlashBackend
from megatron_fcp.testing.reference import reference_attention, varlen_mask

BACKENDS = [TorchFlashBackend, FlashAttnBackend, TransformerEngineBackend]
HQ, HKV, D, SCALE = 4, 2, 64, 0.2
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
CASES = {
    "causal": ((5, 130, 1, 64), (5, 130, 1, 64), True),
    "full": ((5, 130, 1, 64), (7, 3, 200, 1), False),
    "full-single-queries": ((1, 1, 1), (7, 300, 2), False),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs().max().item()
    bound = tol * expected.abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def make_backend(cls):
    try:
        return cls()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", BACKENDS, ids=[c.name for c in BACKENDS])
def test_gpu_backend_matches_float64_reference(cls, dtype, case):
    backend = make_backend(cls)
    q_lens, k_lens, causal = CASES[case]
    call = VarlenCall.make(q_lens, k_lens, causal, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(n, h):
        return torch.randn(n, h, D, generator=gen, device="cuda").to(dtype)

    q, k, v, dout = rand(call.num_q, HQ), rand(call.num_k, HKV), rand(call.num_k, HKV), rand(call.num_q, HQ)
    try:
        backend.check(q, k)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))

    out, lse = backend.forward(q, k, v, call, SCALE)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, call, SCALE)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, varlen_mask(call), SCALE)
    ref_out.backward(dout.double())
    tol = TOL[dtype]
    assert_close(out, ref_out.detach(), tol, "out")
    assert_close(lse, ref_lse.detach(), tol, "lse")
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("cls", BACKENDS, ids=[c.name for c in BACKENDS])
def test_gpu_backends_refuse_cpu_tensors_and_missing_packages(cls, monkeypatch):
    q, k = torch.zeros(4, HQ, D, dtype=torch.bfloat16), torch.zeros(4, HKV, D, dtype=torch.bfloat16)
    try:
        backend = cls()
    except BackendUnavailable as exc:
        assert str(exc)
    else:
        with pytest.raises(BackendUnavailable, match="CUDA"):
            backend.check(q, k)
    package = {FlashAttnBackend: "flash_attn", TransformerEngineBackend: "transformer_engine"}.get(cls)
    if package is not None:
        monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
        with pytest.raises(BackendUnavailable, match="pip install"):
            cls()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("name", ["magi_hist", "linux_files", "spanning"])
def test_gpu_executor_bf16_within_twice_plain_bf16_error(name, mask):
    """All four ranks' FCP attention (forward and backward) on the GPU with torch-flash, in bf16."""
    from megatron_fcp.testing.cases import Case, batch, rel_err
    from megatron_fcp.testing.executor import run_in_process
    from megatron_fcp.testing.layout import join_from_ranks

    case = Case(batch(name, 4, 1024), 4, 1024, mask, head_dim=64)
    bar = {n: 2 * e for n, e in case.plain(torch.bfloat16).items()}
    q, k, v, dout = ([t.cuda() for t in ts] for ts in case.inputs(torch.bfloat16))
    res = run_in_process(case.plan, q, k, v, dout, backend="torch-flash", softmax_scale=case.scale)
    for field, parts in (("out", res.out), ("dq", res.dq), ("dk", res.dk), ("dv", res.dv)):
        err = rel_err(join_from_ranks(case.plan, [p.cpu() for p in parts]), case.ref[field])
        print(f"{name} {mask} {field}: FCP bf16 {err:.2e}, plain bf16 {bar[field] / 2:.2e}")
        assert err <= bar[field], f"{field}: {err:.2e} > 2 x plain bf16 {bar[field] / 2:.2e}"
