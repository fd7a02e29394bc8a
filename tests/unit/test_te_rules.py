"""Where Transformer Engine's THD fused attention runs (sm90+, cuDNN 9.6+ for grouped-query heads): the pure rule,
the backend's check wired to it, and the start-up rule for ``--fcp-attention-backend te``. CPU only."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_fcp.errors import InputError
from megatron_fcp.kernels import te
from megatron_fcp.kernels.base import BackendUnavailable
from megatron_fcp.megatron import config
from megatron_fcp.megatron.config import check_fcp_args, fcp_arg_problems, te_capability_problem


@pytest.mark.parametrize("capability, cudnn, q_heads, kv_heads", [
    ((9, 0), (9, 1, 0), 8, 8),     # H100/H200, same head counts: any cuDNN
    ((9, 0), (9, 6, 0), 32, 8),    # grouped-query heads with cuDNN 9.6
    ((10, 0), (9, 10, 2), 64, 8),  # Blackwell
])
def test_te_runs_on_hopper_and_newer(capability, cudnn, q_heads, kv_heads):
    assert te.te_thd_problem(capability, cudnn, q_heads, kv_heads) is None


@pytest.mark.parametrize("capability, words", [((8, 0), "compute capability 8.0 (sm80)"),
                                               ((8, 6), "compute capability 8.6 (sm86)"),
                                               ((7, 5), "compute capability 7.5 (sm75)")])
def test_te_below_sm90_is_refused_naming_the_gpu_and_the_alternative(capability, words):
    problem = te.te_thd_problem(capability, (9, 10, 0), 8, 8)
    assert words in problem and "sm90" in problem and "\n" not in problem
    assert "--fcp-attention-backend torch-flash" in problem and "flash-attn" in problem


def test_te_with_grouped_query_heads_needs_cudnn_9_6():
    problem = te.te_thd_problem((9, 0), (9, 5, 1), 32, 8)
    assert "32 query heads, 8 key/value heads" in problem and "cuDNN 9.6.0 or newer, found 9.5.1" in problem
    assert "torch-flash" in problem and "\n" not in problem
    assert te.te_thd_problem((9, 0), (9, 5, 1), 8, 8) is None


class _Utils:
    """Stands in for ``transformer_engine.pytorch.utils``."""

    def __init__(self, cudnn):
        self.cudnn = cudnn

    def get_cudnn_version(self):
        return self.cudnn


@pytest.mark.parametrize("capability, cudnn, kv_heads, words", [((8, 0), (9, 10, 0), 4, "sm80"),
                                                                ((9, 0), (9, 5, 0), 2, "cuDNN 9.6.0")])
def test_backend_check_refuses_what_te_cannot_run(monkeypatch, capability, cudnn, kv_heads, words):
    """The backend asks the rule once per device and head counts (no Transformer Engine needed here)."""
    asked = []
    monkeypatch.setattr(te, "check_gpu_inputs", lambda q, k, name: None)
    monkeypatch.setattr(te.torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    backend = object.__new__(te.TransformerEngineBackend)
    backend._utils, backend._problems = _Utils(cudnn), {}
    q, k = torch.zeros(4, 4, 8), torch.zeros(4, kv_heads, 8)
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match=words):
            backend.check(q, k)
    assert len(asked) == 1
    if capability >= te.MIN_CAPABILITY:
        backend.check(q, torch.zeros(4, 4, 8))  # same head counts on Hopper: any cuDNN


# -- start-up rule ---------------------------------------------------------------------------------------------
GOOD = dict(context_parallel_mode="fcp", context_parallel_size=2, seq_length=1024, calculate_per_token_loss=True,
            num_attention_heads=8, position_embedding_type="rope", reset_position_ids=True)


def args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**GOOD, **changes})


def test_start_up_rule_matches_the_kernel_rule():
    assert config.TE_MIN_CAPABILITY == te.MIN_CAPABILITY


@pytest.mark.parametrize("capability", [(8, 0), (8, 9)])
def test_te_backend_below_sm90_fails_at_start_up_naming_the_flag(capability):
    with pytest.raises(InputError) as err:
        check_fcp_args(args(fcp_attention_backend="te"), world_size=2, compute_capability=capability)
    text = str(err.value)
    assert text.startswith("--fcp-attention-backend te needs a sm90 (Hopper) or newer GPU") and "\n" not in text
    assert f"sm{capability[0]}{capability[1]}" in text and "--fcp-attention-backend torch-flash" in text
    assert err.value.flag == "--fcp-attention-backend"


@pytest.mark.parametrize("backend, capability", [("te", (9, 0)), ("te", None), ("auto", (8, 0)),
                                                 ("torch-flash", (8, 0))])
def test_other_backends_new_gpus_and_unknown_gpus_pass(backend, capability):
    assert te_capability_problem(backend, capability) is None
    check_fcp_args(args(fcp_attention_backend=backend), world_size=2, compute_capability=capability)


def test_start_up_reads_this_gpu_only_for_te(monkeypatch):
    monkeypatch.setattr(config, "this_gpu_capability", lambda: pytest.fail("read the GPU for backend auto"))
    assert fcp_arg_problems(args(), world_size=2) == []
    monkeypatch.setattr(config, "this_gpu_capability", lambda: (8, 0))
    assert [flag for flag, _ in fcp_arg_problems(args(fcp_attention_backend="te"), world_size=2)] == [
        "--fcp-attention-backend"]
    monkeypatch.setattr(config, "this_gpu_capability", lambda: None)  # no CUDA here: nothing to say
    assert fcp_arg_problems(args(fcp_attention_backend="te"), world_size=2) == []
