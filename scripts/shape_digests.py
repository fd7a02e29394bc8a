"""Digests of what the attention step computes and counts, to show a refactoring changes none of it.

For a fixed set of cases (causal and full masks, several document mixes, CP 2, 3 and 4, budgets ``auto``, none
and tiny, float64 and float32; the ring and magi placements too) it records sha256 digests of: the planner's
plan digest, the in-process executor's outputs and gradients (the tensors' bytes, every rank), its byte
counters (sent and received per phase) and its memory figures (peak received key/values, key/values kept for
backward); and of the simulator's JSON record (``fcp simulate --json``, less the measured planning time) for a
couple of cells. Prints the JSON (sorted keys) and, on stderr, the sha256 of that text; ``--out FILE`` also
writes the JSON there. Deterministic; runs in seconds.

    PYTHONPATH=. .venv/bin/python scripts/shape_digests.py --out /tmp/digests.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib

import torch

from megatron_fcp.sim.model import load_hardware
from megatron_fcp.sim.simulate import SimConfig, cells_to_json, simulate
from megatron_fcp.testing.cases import Case, batch
from megatron_fcp.testing.executor import run_in_process

TOKENS = 768
"""Tokens of one micro-batch (every CP size here divides it)."""
CASES = [  # (batch, cp, mask, dtype, key/value budget, strategy)
    ("linux_files", 2, "causal", torch.float64, "auto", "fcp"),
    ("spamassassin", 2, "full", torch.float32, None, "fcp"),
    ("spanning", 2, "causal", torch.float32, 16, "fcp"),
    ("magi_hist", 3, "causal", torch.float32, "auto", "fcp"),
    ("ones", 3, "full", torch.float64, 24, "fcp"),
    ("tiny_rank", 3, "causal", torch.float32, 20, "fcp"),
    ("linux_files", 4, "full", torch.float32, "auto", "fcp"),
    ("spamassassin", 4, "causal", torch.float64, 8, "fcp"),
    ("magi_hist", 4, "full", torch.float64, None, "magi"),
    ("linux_files", 4, "causal", torch.float32, "auto", "ring"),
    ("spanning", 3, "full", torch.float32, 40, "ring"),
]
SIM_CELLS = [  # (distribution, CP sizes, budget)
    ("linux_files", (4, 8), "auto"),
    ("magi_hist", (8,), 512),
]


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 over every rank's tensor: dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def case_digests(name: str, cp: int, mask: str, dtype, budget, strategy: str) -> dict:
    case = Case(batch(name, cp, TOKENS // cp), cp, TOKENS // cp, mask, strategy=strategy,
                seed=zlib.crc32(name.encode()) % 1000)
    q, k, v, dout = case.inputs(dtype)
    res = run_in_process(case.plan, q, k, v, dout, backend="cpu", softmax_scale=case.scale, kv_budget_tokens=budget)
    counters = [{"sent": dict(sorted(c.sent.items())), "received": dict(sorted(c.received.items()))}
                for c in res.counters]
    memory = {"peak_kv": [m.peak.get("kv", 0) for m in res.memory], "saved_kv": list(res.saved_kv_bytes)}
    return {"plan_digest": f"{case.plan.digest:x}",
            **{key: tensor_digest(getattr(res, key)) for key in ("out", "dq", "dk", "dv")},
            "counters": sha(json.dumps(counters, sort_keys=True)), "memory": sha(json.dumps(memory, sort_keys=True)),
            "memory_figures": memory}


def sim_digest(lengths: str, cps: tuple[int, ...], budget) -> str:
    config = SimConfig(lengths=(lengths,), cps=cps, tokens_per_rank=2048, num_batches=2, kv_budget_tokens=budget)
    hw = load_hardware("h100_node")
    record = cells_to_json(simulate(config, hw), config, hw)
    for cell in record["cells"]:
        cell.pop("plan_ms")  # the planner's wall time: the one figure that is measured, not derived
    return sha(json.dumps(record, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = {"cases": {}, "sim": {}}
    for name, cp, mask, dtype, budget, strategy in CASES:
        key = f"{strategy}/{name}/cp{cp}/{mask}/{str(dtype).removeprefix('torch.')}/budget {budget}"
        record["cases"][key] = case_digests(name, cp, mask, dtype, budget, strategy)
    for lengths, cps, budget in SIM_CELLS:
        record["sim"][f"{lengths}/cp{','.join(map(str, cps))}/budget {budget}"] = sim_digest(lengths, cps, budget)
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(f"sha256 of the JSON: {sha(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
