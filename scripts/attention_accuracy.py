"""Print the accuracy of FCP attention (in-process executor, ``cpu`` kernels) against a float64 dense reference.

For each batch (shipped distributions and adversarial ones) and mask: the normwise relative error
``max|x - ref| / max|ref|`` of the output and of dq, dk, dv in float32, and in bfloat16 next to the error of a
plain bfloat16 dense implementation (the bar is 2x that). The in-process executor is bit-identical to the
multi-process run (tests/unit/test_attention_distributed.py checks it), so these are the distributed figures.

    .venv/bin/python scripts/attention_accuracy.py
"""

import torch

from megatron_fcp.testing.cases import Case, batch, rel_err
from megatron_fcp.testing.executor import run_in_process
from megatron_fcp.testing.layout import join_from_ranks

KEYS = ("out", "dq", "dk", "dv")


def errors(case: Case, dtype) -> dict[str, float]:
    q, k, v, dout = case.inputs(dtype)
    res = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale)
    got = {"out": res.out, "dq": res.dq, "dk": res.dk, "dv": res.dv}
    return {key: rel_err(join_from_ranks(case.plan, got[key]), case.ref[key]) for key in KEYS}


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'batch':>13} {'mask':>6} {'cp':>2} | fp32 max rel err (out dq dk dv) "
          "| bf16 FCP / plain bf16 (out dq dk dv)")
    worst32, worst_ratio = 0.0, 0.0
    for cp in (2, 4):
        for name in ("linux_files", "spamassassin", "magi_hist", "spanning", "tiny_rank", "ones"):
            for mask in ("causal", "full"):
                case = Case(batch(name, cp, 2048 // cp), cp, 2048 // cp, mask, seed=cp)
                fp32 = errors(case, torch.float32)
                bf16, plain = errors(case, torch.bfloat16), case.plain(torch.bfloat16)
                ratios = {key: bf16[key] / plain[key] for key in KEYS}
                worst32, worst_ratio = max(worst32, *fp32.values()), max(worst_ratio, *ratios.values())
                print(f"{name:>13} {mask:>6} {cp:>2} | " + " ".join(f"{fp32[key]:.1e}" for key in KEYS) + " | "
                      + " ".join(f"{ratios[key]:.2f}" for key in KEYS))
    print(f"worst fp32 relative error {worst32:.2e}; worst bf16 error / plain bf16 error {worst_ratio:.2f}")


if __name__ == "__main__":
    main()
