"""The cost model against MagiAttention's published H100 context-parallel benchmark (256 bars), and FCP on the
same workload. Modeled, not measured.

    .venv/bin/python scripts/model_vs_published.py                 # docs/model_vs_published.{md,json,png}
    .venv/bin/python scripts/model_vs_published.py --small --out-dir out   # the CI case (CP 8 and 16, 2 packs)

Workload: megatron_fcp/sim/magi_workload.py (8K tokens per GPU, CP 8-64, GQA 64:8:8, head dim 128, the 20
varlen packs); strategies: megatron_fcp/sim/published.py; hardware profile h100_node_fa3_published. Every cell
is the mean over the packs of FLOPs / (slowest rank's modeled seconds x CP), forward and backward apart, as
the benchmark reports them.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from megatron_fcp.sim import magi_workload as W
from megatron_fcp.sim import published as P
from megatron_fcp.sim.calibration import fit_kernel, load_published, ring_flash_attention_anchor
from megatron_fcp.sim.model import load_hardware

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "megatron_fcp/data/published/magi_cp_benchmark_h100.yaml"
HARDWARE = "h100_node_fa3_published"
SOURCE = "MagiAttention cp_benchmark H100 (blog 'Long-Context Attention Benchmark', SandAI-org/MagiAttention@2c64135)"
MODELED = ("ulysses", "ring_p2p", "ring_allgather", "usp", "hybrid_dcp", "magi_attn-a2av", "magi_attn-native")
ACCEPTANCE = ("ulysses", "ring_p2p", "ring_allgather", "hybrid_dcp", "magi_attn-a2av", "magi_attn-native")
ORDER = ("ulysses", "ring_p2p", "ring_allgather", "usp", "loongtrain", "hybrid_dcp", "magi_attn-a2av",
         "magi_attn-native", "fcp")
TOLERANCE = 0.20

METHOD = """## What is modeled, and how (megatron_fcp/sim/magi_workload.py, megatron_fcp/sim/published.py)

**Workload.** `magi_workload.py` follows the benchmark's sampler rules (docs/published_cp_benchmarks.md): each
histogram bin becomes its integer midpoint, documents longer than a quarter of the total are cut into
quarter-length pieces plus the remainder, the pieces are shuffled (numpy `default_rng(42)`) and laid end to end,
packs are consecutive windows of exactly `8192 x CP` tokens (the crossing piece cut), the packs are shuffled with
the same generator and the first 20 used. The same numpy calls in the same order are used, so the packs should
be the benchmark's, but that was not checked against the benchmark's own output (exact RNG equality is not
claimed; the rules are tested). Full/causal: one document of the whole length. Throughput: the blog's FLOPs
(`4 x MaskArea x 64 x 128`, backward x 2.5) over (the slowest rank's modeled seconds x CP), mean over packs.

**Hardware.** Profile `h100_node_fa3_published`: `h100_node` (8 GPUs per node, NVLink 450 GB/s per direction,
one 400 Gb/s NIC per GPU, both at the profile's modeled 0.8 efficiency, 10 us per message and per kernel launch),
the benchmark's layer (GQA 64:8, head dim 128, bf16) and FA3 kernel time laws: the three laws fitted to the FA3
paper's H100 figures and a causal backward law derived from them (FA3's full backward law times FA2's
causal/full ratios; the FA3 paper has no causal backward figure; docs/calibration_published.md).

**Kernel calls** (`published.call_s`): one varlen FA3 call per the code's call, work = exact pairs plus edge tiles
per document segment (the simulator's measure), and two additions that leave the calibration shapes unchanged:
a segment costs at least the 128 x 128 tiles it touches, and the per-row cost is paid per tile row (backward: half
per query and half per key row, as FA3's backward runs over key blocks).

**Strategies, as the benchmark's code ran them** (exps/dist_attn/baselines at the commit in the YAML):

- *Ulysses*: all-to-all of q, k, v (layout copies before and after), one FA3 call on the whole sequence with
  64/CP query heads, all-to-all of the output; backward: dout, the call, dq, dk, dv. Above CP 8 the benchmark
  repeats each of the 8 key/value heads CP/8 times before the all-to-all (`run_benchmark.py`), so k and v
  all-to-alls carry CP/8 times the bytes.
- *Ring P2P*: Transformer Engine's zigzag split (each document padded to 2 CP chunks), CP steps of one FA3 call
  each, ranks simulated step by step (each step posts the next transfer; the next step starts when the rank,
  its sender and its receiver have posted and the transfer is through: the slowest link sets the pace);
  forward merges the steps' outputs after the loop; backward sends key/values with the accumulated gradients
  and accumulates dq and dkv every step.
- *Ring All-Gather* (Llama-3 CP): all-gather of k and v, reorder, two FA3 calls per rank (one per zigzag chunk
  against the keys it sees); backward gathers again, accumulates dK/dV over the whole sequence and
  reduce-scatters them. The slowest rank's calls count.
- *USP* (shown, not an acceptance strategy): Ulysses inside the node, the ring over CP/8 nodes on 1/8 of the
  heads. *LoongTrain* is not modeled.
- *HybridCP*: `plan_hybrid` (power-of-two groups, greedy placement), one ring P2P call per document inside its
  group (a plain FA3 call for a group of one), a rank's documents one after another.
- *MagiAttention*: `plan_magi` (2048-token chunks, min-heap dispatch), the simulator's staged exchange with
  two stages (overlap degree 2 in `benchmark_conf.py`); **a2av**: every (source, destination) pair's bytes over
  its link (NCCL all-to-all-v); **native**: group-cast with each byte crossing InfiniBand once per destination
  node (then NVLink), its gradients reduced the same way, holding 48 SMs (`num_sms = 48`).
- *FCP*: `plan_fcp` and the existing p2p cost model (staged exchange, budget `auto`), plus the same added costs
  as MagiAttention (merge per stage, NCCL SM share) and, as its calls are FA3 calls, FA3's backward under GQA
  (`published.dkv_accum_bwd_s`, `"fa3"`: the fp32 dK/dV accumulators the baselines' FA3 calls pay). Above one node (CP 16-64) the node-aware exchange the
  runtime runs there: a key/value taken from a node-mate that holds it in the round before, gradients summed in a
  node-mate's next stage (`planner.relay`), on node rings (`planner.node_ring`).

**What the base model lacked, now modeled (`published.Extras`; `base` columns: without them):**

| cost | model | figure and source |
|---|---|---|
| partial-output merging, gradient accumulation | memory-bound kernels: read the step's output, read-modify-write the result (3x query bytes, bf16); dq/dkv the same | HBM 3.35 TB/s (H100 SXM5 datasheet) x 0.8 (modeled, like the link efficiencies) |
| the benchmark's unpad/pad copies around every FA3 call | gather q, k, v (and out, dout) to the valid tokens, zero-fill + scatter the results: forward 5x query + 2x key/value bytes, backward 9x + 5x | same HBM rate; from `_fa3_varlen_forward/_backward` |
| host issue of many small kernels | a call stretch of n kernels takes at least n x 10 us | the profile's launch cost |
| NCCL kernels taking SMs | while a transfer overlaps attention, attention runs at 1 - sms/132 | NCCL p2p / all-to-all: 16 SMs (modeled); Magi native: 48 SMs (benchmark config); 132 SMs (datasheet) |
| rendezvous of a blocking ring round | + 10 us per round beyond the message latency, and the ring's neighbour coupling (simulated) | modeled: one more message latency |
| FA3 backward under GQA (64 query : 8 key/value heads; Ulysses per rank 64/CP : 1) | per call: fp32 `dk_accum`/`dv_accum` zero-filled over `kv_heads x (total_k + documents x 128) x 128`, every query head's dK/dV block added atomically in fp32 (4 bytes an element beyond the bf16 write of the multi-head calibration shapes), two kernels converting them to bf16 | FlashAttention `hopper/flash_api.cpp` (`mha_bwd`: `dk_accum = torch::zeros(...)` when `num_heads != num_heads_k`), `hopper/flash_bwd_launch_template.h` (`CollectiveEpilogueBwdGQA`, the `PostprocessKerneldKV` launches); same HBM rate; FA3 pinned at 3.0.0b1 in the benchmark's `requirements.txt`, read at the mirror's HEAD |
| MagiAttention's FFA backward (every call) | per call: fp32 partial dK/dV zero-filled over the call's keys (no padding block), every query head's dK/dV tile reduce-added in fp32, cast down to bf16 before the group-reduce (`published.dkv_accum_bwd_s`, `"ffa"`) | MagiAttention `magi_attention/functional/dist_attn.py` (`attn_bwd_partial`: `partial_dkv = torch.zeros_like(kv, dtype=torch.float32)`), `csrc/flexible_flash_attention/epilogue_bwd.hpp` (`SM90_TMA_REDUCE_ADD` of the fp32 output type); same HBM rate; its fp32 partial outputs in the forward are not charged |
| a sender's bandwidth shared among peers | a rank's sends of a round share its links (the model's `_round_comm`); native: per destination node | profile link rates |
| all-to-all, all-gather, reduce-scatter | all-to-all: (n-1)/n of the bytes, NVLink share in the node, NIC share across; all-gather/reduce-scatter: NCCL ring bus bandwidth, S(n-1)/n per NVLink and S(n-1)/(n g) per NIC | profile link rates |

**Calibration honesty.** No parameter was fitted to the MagiAttention figures: every figure above is a
datasheet value, an existing profile value, a value read from the benchmark's code, or a stated modeled
assumption (HBM efficiency 0.8, NCCL 16 SMs, rendezvous 10 us, one launch of idle GPU per host sync, each byte
of an atomic add moved once), chosen before comparing and not tuned per cell.
All 128 varlen cells are therefore held out; the full/causal cells are not fitted either.

**ring-flash-attention anchor** (`published.ring_flash_attention_anchor_costed`, the code at the commit that
published 75.9%, zhuzilin/ring-flash-attention@556ddaa): besides the fp32 merges and accumulations, transfers
and SM share already modeled, (a) FlashAttention-2's GQA backward (32:8 heads) writes dK/dV per query head
(`dk_expanded`) and sums them with `at::sum_out` (`csrc/flash_attn/flash_api.cpp`, `mha_varlen_bwd`): the read
of the expanded tensors and the write of the sums, in the single-GPU reference and in every ring step; (b) host
synchronisations counted from the code: `get_half_index` sizes a CPU mask with a CUDA scalar and fills it with
CUDA-scalar bounds (1 + 2 per document, twice, forward), `get_half_lse` calls `.item()` twice per document
(backward), and every boolean-mask (or CUDA-bounded slice) index of a CUDA tensor makes a blocking copy
(PyTorch `aten/src/ATen/native/cuda/Copy.cu`: `memcpy_and_sync`): forward 2 per step with a source before the
rank (`k0`, `v0`) and 4 after it (`out`, `lse` read and written back), backward 6 and 2 (`k0`, `v0`, `dk[i0] +=`,
`dv[i0] +=` / `dq[i1] +=`), plus 1 and 3 before the loops. Each sync empties the GPU's queue; it is charged one
kernel launch of idle GPU (the profile's 10 us; `SYNC_IDLE_LAUNCHES = 1`, modeled, not fitted). The single-GPU
call has no syncs.

**Known gaps.** (1) Ring P2P on varlen packs is modeled 1.1-1.9x too fast, its forward at every CP, while its
full/causal cells agree (0.97-1.21); the FA3 backward's GQA accumulators closed part of the backward gap, the
forward's is not identified (FA3's varlen forward uses a persistent scheduler with packed GQA heads, TE's THD
helpers are single memory passes, the wrappers' copies are charged); a GPU profile of one step is what the
model needs. (2) Across nodes Ulysses and Ring All-Gather forward need more
inter-node bandwidth than one 400 Gb/s NIC per GPU gives: e.g. Ulysses' forward at CP 64 moves about 470 MB per
GPU over InfiniBand (repeated key/value heads included) and its published time is below what 50 GB/s allows;
the benchmark cluster's interconnect is not stated. (3) Ring All-Gather backward on varlen is modeled too fast
(1.1-2.0x at CP 16-64 after the GQA accumulators), growing with CP: FA3's varlen backward launches a grid of
`ceil(max_seqlen_k / 128) x 64 heads x documents` CTAs per call (`SingleTileScheduler` over `seqlen_k`, tiles
past a document's end exit at once), about 0.6 M per rank at CP 8 and 20 M at CP 64 (2 calls, mean over the
packs), of which 0.07 M and 0.5 M have work; the cost of the empty ones is not modeled (no sourced figure per
CTA). (4) MagiAttention's solver and experimental features are not reproduced (min-heap dispatch
stands in). (5) LoongTrain is not modeled.
"""  # noqa: E501


def published_rows(path: Path = PUBLISHED) -> list[dict]:
    return yaml.safe_load(path.read_text())["figures"]


def _cell(args):
    """(mask, cp, strategy, packs): per pass the mean TFLOP/s/GPU over the packs, with and without the added
    costs, and the seconds per pack."""
    mask, cp, strategy, packs = args
    hw = load_hardware(HARDWARE)
    docs, kernel_mask = W.workload_docs(mask, cp, packs)
    out = {"mask": mask, "cp": cp, "strategy": strategy}
    for label, extras in (("modeled", P.Extras()), ("base", P.BASE)):
        tf = {"fwd": [], "bwd": []}
        for lens in docs:
            sec = P.strategy_seconds(strategy, hw, extras, lens, cp, kernel_mask, W.TOKENS_PER_GPU)
            for pass_ in tf:
                tf[pass_].append(W.tflops_per_gpu(lens, kernel_mask, pass_, cp, sec[pass_]))
        for pass_ in tf:
            out[f"{label}_{pass_}"] = float(np.mean(tf[pass_]))
    out["packs"] = len(docs)
    return out


def reason(strategy: str, mask: str, pass_: str, cp: int, ratio: float) -> str:
    """One line on why a cell misses and what the model would need (judged from the model's breakdown)."""
    fast = ratio > 1
    varlen = mask.startswith("varlen")
    if strategy == "ring_p2p" and varlen and fast and pass_ == "bwd":
        return ("modeled too fast: FA3's varlen backward grid (ceil(max_seqlen_k/128) x 64 heads x documents "
                "CTAs per step, mostly empty: 0.3 M per rank at CP 8, 10 M at CP 64) and the per-step host work "
                "are not costed; needs a measured cost per empty CTA or a per-step profile")
    if strategy == "ring_p2p" and varlen and fast:
        return ("modeled too fast: not identified (FA3's varlen forward has no empty-tile grid; TE's THD helpers "
                "and the wrappers' copies are charged as memory passes); needs a per-step GPU profile of the "
                "ring on a varlen pack")
    if strategy in ("ring_p2p", "hybrid_dcp") and not varlen and fast:
        return ("modeled too fast: the causal/full ring's per-step losses (merge, wrapper copies) are modeled; "
                "the rest of the published gap is not identified; needs a per-step GPU profile of TE's ring")
    if strategy in ("ulysses", "ring_allgather", "usp") and varlen and not fast and cp > 8:
        return ("modeled too slow across nodes: the published time is below what one 400 Gb/s NIC per GPU "
                "allows for the bytes this strategy moves over InfiniBand; the benchmark cluster's inter-node "
                "bandwidth (not stated) must be higher; needs the cluster's NIC bandwidth")
    if strategy == "ring_allgather" and varlen and pass_ == "bwd" and fast:
        return ("modeled too fast, more so with CP: FA3's varlen backward grid over the whole gathered keys "
                "(ceil(max_seqlen_k/128) x 64 heads x documents CTAs, 2 calls: 0.6 M per rank at CP 8, 20 M at "
                "CP 64, ~3-10% with work) is not costed; needs a measured cost per empty CTA")
    if strategy == "ring_allgather" and varlen and not fast:
        return ("modeled too slow: the all-gather, reorder and unpad copies of the whole key/value sequence are "
                "charged in full; the published figure implies they overlap or cost less; needs a profile")
    if strategy.startswith("magi_attn") and varlen:
        return ("MagiAttention's dispatch solver and experimental features (blog line 406) differ from the "
                "modeled min-heap dispatch with overlap degree 2; needs its solver's actual plans")
    if strategy == "usp" and varlen:
        return ("USP modeled as Ulysses in the node x a ring over nodes with the ring's per-step costs; "
                "its ring across nodes on 1/8 of the heads is only approximated")
    return "not identified; needs a per-kernel profile of this cell"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    p.add_argument("--packs", type=int, default=W.PACK_NUM, help="varlen packs per cell (the benchmark: 20)")
    p.add_argument("--cp", default=",".join(map(str, W.CP_SIZES)))
    p.add_argument("--small", action="store_true", help="the CI case: CP 8 and 16, 2 packs, no plot")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    args = p.parse_args(argv)
    if args.small:
        args.cp, args.packs = "8,16", min(args.packs, 2)
    cps = [int(c) for c in args.cp.split(",")]
    started = time.perf_counter()
    work = [(mask, cp, s, args.packs) for mask in W.MASKS for cp in cps for s in (*MODELED, "fcp")]
    work.sort(key=lambda w: -w[1])  # the large cells first
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            cells = list(pool.map(_cell, work))
    else:
        cells = [_cell(w) for w in work]
    model = {(c["strategy"], c["mask"], c["cp"]): c for c in cells}
    rows = build_rows(model, cps)
    anchor = anchor_figures()
    elapsed = time.perf_counter() - started
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/model_vs_published.py" + ("" if argv is None else " " + " ".join(argv))
    (out / "model_vs_published.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "model_vs_published.md").write_text(markdown(rows, anchor, command, elapsed, args.packs, cps) + "\n")
    if not args.small:
        plot(rows, out / "model_vs_published.png")
    print(f"wrote {out}/model_vs_published.md, .json{'' if args.small else ', .png'} in {elapsed:.0f} s")


def build_rows(model: dict, cps: list[int]) -> list[dict]:
    rows = []
    for r in published_rows():
        if r["cp"] not in cps:
            continue
        key = (r["strategy"], r["mask"], r["cp"])
        row = {"source": SOURCE, "strategy": r["strategy"], "mask": r["mask"], "pass": r["pass"], "cp": r["cp"],
               "published_tflops_per_gpu": r["tflops_per_gpu"], "published_err": r["err"],
               "modeled_tflops_per_gpu": None, "base_model_tflops_per_gpu": None, "ratio": None,
               "within_20pct": None, "acceptance": r["strategy"] in ACCEPTANCE and r["mask"].startswith("varlen"),
               "reason": None, "hardware": HARDWARE}
        if key in model:
            m = model[key]
            row["modeled_tflops_per_gpu"] = round(m[f"modeled_{r['pass']}"], 1)
            row["base_model_tflops_per_gpu"] = round(m[f"base_{r['pass']}"], 1)
            row["ratio"] = round(m[f"modeled_{r['pass']}"] / r["tflops_per_gpu"], 3)
            row["within_20pct"] = abs(row["ratio"] - 1) <= TOLERANCE
            row["packs"] = m["packs"]
            if not row["within_20pct"]:
                row["reason"] = reason(r["strategy"], r["mask"], r["pass"], r["cp"], row["ratio"])
        else:
            row["reason"] = "not modeled (LoongTrain's double ring is not in the model)"
        rows.append(row)
    native = {(r["mask"], r["pass"], r["cp"]): r["published_tflops_per_gpu"] for r in rows
              if r["strategy"] == "magi_attn-native"}
    for (strategy, mask, cp), m in sorted(model.items()):
        if strategy != "fcp":
            continue
        for pass_ in W.PASSES:
            rows.append({"source": "model (this project's planner plan_fcp + the p2p cost model)", "strategy": "fcp",
                         "mask": mask, "pass": pass_, "cp": cp, "published_tflops_per_gpu": None,
                         "modeled_tflops_per_gpu": round(m[f"modeled_{pass_}"], 1),
                         "base_model_tflops_per_gpu": round(m[f"base_{pass_}"], 1),
                         "magi_native_published_tflops_per_gpu": native.get((mask, pass_, cp)),
                         "ratio": None, "within_20pct": None, "acceptance": False, "reason": None,
                         "hardware": HARDWARE, "packs": m["packs"]})
    return rows


def anchor_figures() -> dict:
    hw = load_hardware("h100_node")
    laws = fit_kernel(load_published(), "fa2", hw.peak_bf16_dense_tflops, hw.kernel_launch_us * 1e-6, hw.tile_size)
    before = ring_flash_attention_anchor(laws, hw.peak_bf16_dense_tflops, hw.kernel_launch_us * 1e-6, hw.tile_size)
    after = P.ring_flash_attention_anchor_costed(laws, hw.peak_bf16_dense_tflops, hw.kernel_launch_us * 1e-6,
                                                 hw.tile_size)
    return {"before_ratio": before.ratio, "before_ring_iter_s": before.ring_iter_s,
            "single_iter_s": before.single_iter_s, "single_iter_s_costed": float(after["single_iter_s_costed"]),
            "after_ratio": float(after["ratio"]),
            "after_ring_iter_s": float(after["ring_iter_s"]), "published_ratio": after["published_ratio"]}


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown(rows, anchor, command, elapsed, packs, cps) -> str:
    lines = ["# The cost model against published multi-GPU measurements (MagiAttention, H100)", "",
             f"Generated by `{command}` in {elapsed:.0f} s on this project's 2-core CPU machine (no GPU). "
             f"Hardware profile `{HARDWARE}`; {packs} varlen packs per cell. Modeled, not measured: every "
             "`modeled` figure is the cost model's; every `published` figure is a pixel reading of the "
             "MagiAttention blog's H100 figures (docs/published_cp_benchmarks.md, +-0.3 TFLOP/s).", "",
             "How the model works, what was added and what was calibrated: section \"What is modeled, and how\" "
             "after the per-cell tables.", ""]
    lines += summary(rows)
    lines += ["## FCP (modeled) beside MagiAttention native (published)", "",
              "FCP: `plan_fcp` + the p2p cost model (staged exchange, key/value budget `auto`; above one node "
              "the node-aware exchange, `planner.relay` and `planner.node_ring`) with the added costs (merge per "
              "stage, NCCL SM share, FA3's backward under GQA); "
              "`base`: the p2p cost model without the added costs. "
              "TFLOP/s per GPU by the blog's formula.", "",
              "| mask | pass | " + " | ".join(f"CP {c}: FCP / FCP base / Magi native pub." for c in cps) + " |",
              "|---|---|" + "---|" * len(cps)]
    for mask in W.MASKS:
        for pass_ in W.PASSES:
            cells = []
            for cp in cps:
                r = next((r for r in rows if r["strategy"] == "fcp" and (r["mask"], r["pass"], r["cp"]) ==
                          (mask, pass_, cp)), None)
                cells.append("-" if r is None else f"{_fmt(r['modeled_tflops_per_gpu'])} / "
                             f"{_fmt(r['base_model_tflops_per_gpu'])} / "
                             f"{_fmt(r['magi_native_published_tflops_per_gpu'])}")
            lines.append(f"| {mask} | {pass_} | " + " | ".join(cells) + " |")
    lines += ["", "## ring-flash-attention's zigzag varlen benchmark (8 x H800, causal, 32/8 heads)", "",
              "| figure | published | kernels only (before) | with the added costs (after) |", "|---|---|---|---|",
              f"| ring iterations/s | 21.4 | {anchor['before_ring_iter_s']:.1f} | {anchor['after_ring_iter_s']:.1f} |",
              f"| ring / ideal (single GPU / 8) | {100 * anchor['published_ratio']:.1f}% | "
              f"{100 * anchor['before_ratio']:.1f}% | {100 * anchor['after_ratio']:.1f}% |", "",
              f"Target: within 10% of 75.9%, i.e. 68.3% to 83.5%. After: {100 * anchor['after_ratio']:.1f}% "
              f"({'inside' if 0.683 <= anchor['after_ratio'] <= 0.835 else 'outside'} the band). Single-GPU "
              f"modeled {anchor['single_iter_s']:.1f} iterations/s kernels only, {anchor['single_iter_s_costed']:.1f} "
              f"with FlashAttention-2's GQA backward sums (the 'after' ratio's reference), against 225.4 published.",
              ""]
    lines += ["## Every cell: published | modeled | modeled/published", "",
              "`base`: the model without the added costs. `*`: outside 20%. LoongTrain is not modeled.", ""]
    for mask in W.MASKS:
        for pass_ in W.PASSES:
            lines += [f"### {mask}, {pass_}", "", "| strategy | " + " | ".join(
                f"CP {c}: pub. / model (base) / ratio" for c in cps) + " |", "|---|" + "---|" * len(cps)]
            for strategy in ORDER[:-1]:
                cells = []
                for cp in cps:
                    r = next((r for r in rows if (r["strategy"], r["mask"], r["pass"], r["cp"]) ==
                              (strategy, mask, pass_, cp)), None)
                    if r is None:
                        cells.append("-")
                        continue
                    star = "" if r["within_20pct"] in (None, True) else "*"
                    cells.append(f"{_fmt(r['published_tflops_per_gpu'])} / {_fmt(r['modeled_tflops_per_gpu'])} "
                                 f"({_fmt(r['base_model_tflops_per_gpu'])}) / {_fmt(r['ratio'], '.2f')}{star}")
                lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [METHOD]
    misses = [r for r in rows if r["within_20pct"] is False]
    lines += ["## Misses and their reasons", "", "| strategy | mask | pass | CP | published | modeled | ratio | "
              "reason and what the model would need |", "|---|---|---|---|---|---|---|---|"]
    for r in misses:
        lines.append(f"| {r['strategy']} | {r['mask']} | {r['pass']} | {r['cp']} | {r['published_tflops_per_gpu']}"
                     f" | {r['modeled_tflops_per_gpu']} | {r['ratio']:.2f} | {r['reason']} |")
    return "\n".join(lines)


def summary(rows) -> list[str]:
    lines = ["## Summary: cells within 20% of the published figure", "",
             "Acceptance cells: Ring P2P, Ring All-Gather, Ulysses, HybridCP, MagiAttention a2av and native on the "
             "varlen masks (held out: nothing was fitted on them). Full and causal cells and USP are shown too.", "",
             "| strategy | mask | fwd within 20% | bwd within 20% |", "|---|---|---|---|"]
    total = hit = 0
    for strategy in ORDER[:-1]:
        for mask in W.MASKS:
            cells = []
            for pass_ in W.PASSES:
                sel = [r for r in rows if (r["strategy"], r["mask"], r["pass"]) == (strategy, mask, pass_)
                       and r["within_20pct"] is not None]
                n_in = sum(r["within_20pct"] for r in sel)
                cells.append(f"{n_in}/{len(sel)}" if sel else "not modeled")
                if sel and strategy in ACCEPTANCE and mask.startswith("varlen"):
                    total, hit = total + len(sel), hit + n_in
            lines.append(f"| {strategy} | {mask} | {cells[0]} | {cells[1]} |")
    every = [r for r in rows if r["within_20pct"] is not None]
    lines += ["", f"Acceptance cells within 20%: **{hit} of {total}**. All modeled cells: "
              f"{sum(r['within_20pct'] for r in every)} of {len(every)}.", ""]
    return lines


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 9), squeeze=False)
    for col, mask in enumerate(W.MASKS):
        for row_i, pass_ in enumerate(W.PASSES):
            ax = axes[row_i, col]
            for k, strategy in enumerate(ORDER):
                sel = sorted((r for r in rows if (r["strategy"], r["mask"], r["pass"]) == (strategy, mask, pass_)),
                             key=lambda r: r["cp"])
                if not sel:
                    continue
                cps = [r["cp"] for r in sel]
                pub = [r["published_tflops_per_gpu"] for r in sel]
                mod = [r["modeled_tflops_per_gpu"] for r in sel]
                if any(v is not None for v in pub):
                    ax.plot(cps, pub, "-o", color=f"C{k}", markersize=4, label=f"{strategy} published")
                if any(v is not None for v in mod):
                    ax.plot(cps, mod, "--x", color=f"C{k}", markersize=5, label=f"{strategy} modeled")
            ax.set_xscale("log", base=2)
            ax.set_xticks([8, 16, 32, 64], ["8", "16", "32", "64"])
            ax.set_title(f"{mask}, {pass_}", fontsize=10)
            ax.set_xlabel("CP size")
            ax.set_ylabel("TFLOP/s per GPU")
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=6, fontsize=8, loc="lower center")
    fig.suptitle(f"MagiAttention H100 CP benchmark: published (solid) vs modeled (dashed, {HARDWARE})", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
