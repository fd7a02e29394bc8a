"""``run_in_process`` refuses inputs that do not fit the plan with one line naming the tensor and its expected
shape (a wrong ``dout`` head count used to give a relative error of 1e34; wrong list lengths an IndexError)."""

from __future__ import annotations

import pytest
import torch

from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.testing.executor import run_in_process

CP, TOKENS = 2, 64


def _inputs(heads=2, kv_heads=1, dim=8):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(TOKENS, h, dim, generator=g, dtype=torch.float64) for _ in range(CP)]
            for h in (heads, kv_heads, kv_heads, heads)]


@pytest.fixture(scope="module")
def plan():
    return make_plan([100, 28], CP, TOKENS, "causal")


def test_good_inputs_run(plan):
    q, k, v, dout = _inputs()
    assert run_in_process(plan, q, k, v, dout, backend="reference").dq[1].shape == (TOKENS, 2, 8)


@pytest.mark.parametrize("change, needle", [
    (lambda q, k, v, d: (q, k, v, [x[:, :1].contiguous() for x in d]), "dout[0] must be shaped like q[0], (64, 2, 8)"),
    (lambda q, k, v, d: (q[:1], k, v, d), "q must be a list of 2 tensors"),
    (lambda q, k, v, d: (q, k, v, d[:1]), "dout must be a list of 2 tensors"),
    (lambda q, k, v, d: ([q[0], q[1][:-1]], k, v, d), "q has 63 tokens but the plan gives this rank 64"),
    (lambda q, k, v, d: ([q[0], q[1].float()], [k[0], k[1].float()], [v[0], v[1].float()], d),
     "q[1] is torch.float32 (64, 2, 8) but q[0] is torch.float64"),
    (lambda q, k, v, d: (q, [k[0], torch.cat([k[1]] * 2, 1)], [v[0], torch.cat([v[1]] * 2, 1)], d),
     "k[1] is torch.float64 (64, 2, 8) but k[0] is torch.float64 (64, 1, 8)"),
])
def test_bad_inputs_are_named_in_one_line(plan, change, needle):
    with pytest.raises(InputError) as err:
        run_in_process(plan, *change(*_inputs()), backend="reference")
    assert needle in str(err.value) and "\n" not in str(err.value)
