"""Kernel-efficiency calibration of the cost model from published FlashAttention figures (no GPU needed).

The fixed utilisations of a hardware profile (60% forward, 45% backward of peak) ignore that attention kernels
are slow on short sequences. This module fits, per kernel family, pass (forward, backward) and mask (causal
diagonal, full), a two-parameter kernel time law to the H100 figures of the FlashAttention-2/3 papers
(``megatron_fcp/data/hardware/published_attention_h100.yaml``, every number with its source):

    seconds(call) = launch + flops_per_pair * (edge_pairs + row_overhead_keys * query_rows) / (peak * max_efficiency)

``edge_pairs`` is the cost model's own work measure of the call's segments (exact pairs plus the partly filled
edge tiles, :func:`megatron_fcp.sim.model._eff_pairs`); ``row_overhead_keys`` is a fixed cost per query row in
key-equivalents (loading the query block, rescaling, writing the output: it makes short segments slow), and
``max_efficiency`` the fraction of peak the kernel reaches on long segments. Both enter linearly in
``1 / TFLOP/s``, so the fit is a least-squares solve on relative error (``launch`` is the profile's modeled
per-call cost, not fitted: the figures time one call over 16K tokens, where it is below 5%).

The published setup (FlashAttention-3 paper Sec. 4.1): sequence length ``L`` from 512 to 16K, batch ``16384 /
L``, 16 heads of dimension 128 (hidden 2048), FLOPs ``4 L^2 d h`` per sequence forward (halved when causal),
backward 2.5x forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from megatron_fcp.errors import InputError

PUBLISHED = "published_attention_h100.yaml"
PASSES = ("fwd", "bwd")
MASKS = ("full", "causal")
BWD_FLOPS_FACTOR = 2.5  # the papers' convention (5 matmuls backward vs 2 forward)


@dataclass(frozen=True)
class KernelLaw:
    """Fitted time law of one (kernel, pass, mask); see the module docstring."""

    max_efficiency: float
    """Fraction of peak on long segments."""
    row_overhead_keys: float
    """Fixed cost per query row, in key-equivalents of work."""
    points: int
    """Published figures fitted."""
    max_rel_error: float
    """Largest relative error of the fitted law on those figures (time, equivalently TFLOP/s)."""
    sources: tuple[str, ...]
    """Figure ids of the fitted numbers (``source:`` keys of the published file)."""


def load_published(path: str | Path | None = None) -> dict:
    """The published figures file (default: the shipped one)."""
    if path is None:
        return yaml.safe_load((resources.files("megatron_fcp") / "data" / "hardware" / PUBLISHED).read_text())
    return yaml.safe_load(Path(path).read_text())


def benchmark_shape(seqlen: int, causal: bool, tile: int, total_tokens: int = 16384) -> tuple[float, float, float]:
    """(papers' pairs, model work pairs, query rows) of one published benchmark call, per head: ``16384 / L``
    sequences of ``L`` tokens. The papers count ``L^2`` pairs per sequence, ``L^2 / 2`` when causal; the model
    counts exact pairs plus edge tiles (a causal sequence is one diagonal segment)."""
    batch = total_tokens // seqlen
    paper = batch * seqlen * seqlen / (2 if causal else 1)
    exact = seqlen * (seqlen + 1) / 2 if causal else float(seqlen * seqlen)
    work = batch * (exact + tile / 2 * (seqlen + seqlen) + tile * tile / 4)
    return paper, work, float(batch * seqlen)


def published_points(data: dict, kernel: str, pass_: str, causal: bool, head_dim: int = 128) -> list[dict]:
    """The published rows of one (kernel, pass, mask) at ``head_dim``, with a number (OOM cells dropped).
    Backward of a causal mask is not published for FlashAttention-2 alone: it is derived from the FA2 paper's
    forward + backward figure and the FA3 paper's FA2 forward figure (``derived_from``)."""
    rows = [r for r in data["kernel_tflops"] if r["kernel"] == kernel and r["pass"] == pass_
            and bool(r["causal"]) == causal and r["head_dim"] == head_dim and r.get("tflops")]
    if rows or pass_ != "bwd":
        return rows
    both = {r["seqlen"]: r for r in data["kernel_tflops"] if r["kernel"] == kernel and r["pass"] == "fwd_bwd"
            and bool(r["causal"]) == causal and r["head_dim"] == head_dim and r.get("tflops")}
    fwd = {r["seqlen"]: r for r in published_points(data, kernel, "fwd", causal, head_dim)}
    derived = []
    for seqlen in sorted(both.keys() & fwd.keys()):
        # fwd + bwd takes 3.5 units of forward FLOPs: 3.5 / C = 1 / F + 2.5 / B
        inverse = (1 + BWD_FLOPS_FACTOR) / both[seqlen]["tflops"] - 1 / fwd[seqlen]["tflops"]
        if inverse > 0:
            derived.append({"source": f"{both[seqlen]['source']}+{fwd[seqlen]['source']}", "kernel": kernel,
                            "pass": "bwd", "causal": causal, "head_dim": head_dim, "seqlen": seqlen,
                            "tflops": BWD_FLOPS_FACTOR / inverse, "derived_from": "fwd_bwd and fwd"})
    return derived


def fit_law(rows: list[dict], causal: bool, peak_tflops: float, launch_s: float, tile: int) -> KernelLaw:
    """Least-squares fit of ``max_efficiency`` and ``row_overhead_keys`` to published rows (relative error)."""
    if len(rows) < 2:
        raise InputError(f"{len(rows)} published figures: need at least 2 to fit a kernel law")
    a, b, y = [], [], []
    for r in rows:
        paper, work, q_rows = benchmark_shape(r["seqlen"], causal, tile)
        # time in units of c = 4 d h f / peak (f = 2.5 backward): the law reads (work + k0 rows) / E
        t = paper * peak_tflops / r["tflops"]
        factor = BWD_FLOPS_FACTOR if r["pass"] == "bwd" else 1.0
        t_launch = launch_s * peak_tflops * 1e12 / (4 * r.get("nheads", 16) * r["head_dim"] * factor)
        a.append(work)
        b.append(q_rows)
        y.append(t - t_launch)
    a, b, y = np.array(a), np.array(b), np.array(y)
    weights = 1.0 / y
    solution, *_ = np.linalg.lstsq(np.stack([a * weights, b * weights], axis=1), np.ones_like(y), rcond=None)
    inv_eff, overhead_over_eff = solution
    if inv_eff <= 0:
        raise InputError("the published figures do not fit a positive efficiency")
    fitted = inv_eff * a + overhead_over_eff * b
    return KernelLaw(max_efficiency=float(1 / inv_eff), row_overhead_keys=float(overhead_over_eff / inv_eff),
                     points=len(rows), max_rel_error=float(np.max(np.abs(fitted / y - 1))),
                     sources=tuple(sorted({r["source"] for r in rows})))


def fit_kernel(data: dict, kernel: str, peak_tflops: float, launch_s: float, tile: int,
               head_dim: int = 128) -> dict[tuple[str, str], KernelLaw]:
    """Every (pass, mask) law of ``kernel`` that has published figures."""
    laws = {}
    for pass_ in PASSES:
        for mask in MASKS:
            rows = published_points(data, kernel, pass_, mask == "causal", head_dim)
            if len(rows) >= 2:
                laws[pass_, mask] = fit_law(rows, mask == "causal", peak_tflops, launch_s, tile)
    return laws


def law_seconds(law: KernelLaw, pass_: str, work_pairs, query_rows, flops_per_pair: float, peak_tflops: float,
                launch_s: float, calls=1.0):
    """Seconds of kernel calls: ``calls`` launches plus the law's time for ``work_pairs`` (exact plus edge
    tiles) over ``query_rows`` rows, at ``flops_per_pair`` forward FLOPs per pair."""
    factor = BWD_FLOPS_FACTOR if pass_ == "bwd" else 1.0
    work = np.asarray(work_pairs, dtype=np.float64) + law.row_overhead_keys * np.asarray(query_rows, np.float64)
    return launch_s * np.asarray(calls) + work * flops_per_pair * factor / (peak_tflops * 1e12 * law.max_efficiency)


def to_yaml(kernel: str, laws: dict[tuple[str, str], KernelLaw], note: str) -> str:
    """A calibration file: the fitted laws with their sources and fit errors."""
    body = {"kernel": kernel, "note": note,
            "laws": {f"{p}_{m}": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(law).items()}
                     for (p, m), law in sorted(laws.items())}}
    return yaml.safe_dump(body, sort_keys=False)


# -- the ring-flash-attention anchor ----------------------------------------------------------------------------
RING_FLASH_ATTENTION_VARLEN = ((8192,), (256, 7392, 544), (4096, 4096), (3104, 3200, 1600, 160, 128))
"""Local document lengths its varlen benchmark cycles through (benchmark/benchmark_varlen_kvpacked_func.py)."""


@dataclass(frozen=True)
class RingAnchor:
    """Modeled kernel time of ring-flash-attention's varlen benchmark (8 GPUs, 8192 tokens each, causal, 32/8
    heads of 128, forward + backward) beside its published figures."""

    single_iter_s: float
    """Modeled iterations per second of one GPU's flash_attn_varlen call on its 8192 tokens (published: 225.4)."""
    ring_iter_s: float
    """Modeled iterations per second of the zigzag ring, kernels only (published: 21.4)."""
    ratio: float
    """Modeled ring speed over the ideal (single / 8) (published: 0.759)."""


def ring_flash_attention_anchor(laws: dict[tuple[str, str], KernelLaw], peak_tflops: float, launch_s: float,
                                tile: int, world: int = 8, heads: int = 32, head_dim: int = 128) -> RingAnchor:
    """The zigzag ring's kernel calls, modeled with ``laws``: step 0 the causal diagonal of the rank's two chunks
    of each document; steps 1..world-1 a full call, all local queries against the first half of the received
    chunks (a source before the rank) or the second half of the queries against all of them (after it); ranks
    step together, so each step takes its slowest call. No communication, no merging of partial results: the
    difference to the published figure is what the kernels do not explain."""
    flops_per_pair = 4.0 * heads * head_dim

    def seconds(pass_, mask, segments):
        work = sum(exact + tile / 2 * (q + k) + tile * tile / 4 for q, k, exact in segments)
        rows = sum(q for q, _, _ in segments)
        return float(law_seconds(laws[pass_, mask], pass_, work, rows, flops_per_pair, peak_tflops, launch_s))

    single = ring = 0.0
    for lens in RING_FLASH_ATTENTION_VARLEN:
        diagonal = [(n, n, n * (n + 1) / 2) for n in lens]
        first_half = [(n, n // 2, n * (n // 2)) for n in lens]
        second_half = [(n - n // 2, n, (n - n // 2) * n) for n in lens]
        for pass_ in PASSES:
            single += seconds(pass_, "causal", diagonal)
            ring += seconds(pass_, "causal", diagonal) + (world - 1) * max(
                seconds(pass_, "full", first_half), seconds(pass_, "full", second_half))
    n = len(RING_FLASH_ATTENTION_VARLEN)
    return RingAnchor(single_iter_s=n / single, ring_iter_s=n / ring, ratio=world * single / ring)


def laws_from_yaml(text: str) -> dict[tuple[str, str], KernelLaw]:
    """The laws of a calibration file written by :func:`to_yaml` (keys ``(pass, mask)``)."""
    raw = yaml.safe_load(text)
    laws = {}
    for key, value in (raw or {}).get("laws", {}).items():
        pass_, _, mask = key.partition("_")
        if pass_ not in PASSES or mask not in MASKS:
            raise InputError(f"calibration law {key!r}: expected <{'|'.join(PASSES)}>_<{'|'.join(MASKS)}>")
        laws[pass_, mask] = KernelLaw(max_efficiency=float(value["max_efficiency"]),
                                      row_overhead_keys=float(value["row_overhead_keys"]),
                                      points=int(value.get("points", 0)),
                                      max_rel_error=float(value.get("max_rel_error", 0.0)),
                                      sources=tuple(value.get("sources", ())))
    missing = [f"{p}_{m}" for p in PASSES for m in MASKS if (p, m) not in laws]
    if missing:
        raise InputError(f"calibration file has no law for {', '.join(missing)}: the cost model needs all four")
    return laws


# -- laws from measured kernel calls (the GPU script's timings) -------------------------------------------------
def call_work(q_lens, k_lens, causal: bool, tile: int) -> tuple[float, float, float]:
    """(exact pairs, model work pairs, query rows) of one varlen call: causal segments are diagonal blocks
    (``n (n + 1) / 2`` pairs), full ones ``q k``; work adds the edge tiles of every segment."""
    exact = work = rows = 0.0
    for q, k in zip(q_lens, k_lens, strict=True):
        pairs = q * (q + 1) / 2 if causal else float(q * k)
        exact += pairs
        work += pairs + tile / 2 * (q + k) + tile * tile / 4
        rows += q
    return exact, work, rows


def _solve(work, rows, seconds, unit, launch_s):
    """Least squares on relative error of ``seconds = launch + unit (work a + rows b)``; ``launch_s`` None: fitted
    too (kept >= 0). Returns (a, b, launch)."""
    w = 1.0 / seconds
    if launch_s is None:
        columns = np.stack([unit * work * w, unit * rows * w, w], axis=1)
        (a, b, launch), *_ = np.linalg.lstsq(columns, np.ones_like(seconds), rcond=None)
        if launch >= 0:
            return a, b, launch
        launch_s = 0.0
    columns = np.stack([unit * work * w, unit * rows * w], axis=1)
    (a, b), *_ = np.linalg.lstsq(columns, 1.0 - launch_s * w, rcond=None)
    return a, b, launch_s


def fit_calls(records: list[dict], peak_tflops: float, q_heads: int, head_dim: int, tile: int
              ) -> tuple[dict[tuple[str, str], KernelLaw], float]:
    """Kernel laws and one launch cost fitted to measured calls: records with ``causal``, ``fwd_ms``, ``bwd_ms``
    (medians) and either ``q_lens``, ``k_lens`` or the call's totals ``pairs`` (exact), ``num_q``, ``num_k``,
    ``num_segments``. The launch cost is fitted per law first, then fixed at their mean (>= 0) and
    every law fitted again with it, so one profile's ``kernel_launch_us`` serves all four."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        if "q_lens" in r:
            _, work, rows = call_work(r["q_lens"], r["k_lens"], bool(r["causal"]), tile)
        else:  # totals of the call: exact pairs, query and key tokens, segments (edges add up per segment)
            rows = float(r["num_q"])
            work = r["pairs"] + tile / 2 * (r["num_q"] + r["num_k"]) + tile * tile / 4 * r["num_segments"]
        mask = "causal" if r["causal"] else "full"
        for pass_ in PASSES:
            groups.setdefault((pass_, mask), []).append((work, rows, r[f"{pass_}_ms"] * 1e-3))
    if len(groups) < 4 or min(len(v) for v in groups.values()) < 3:
        raise InputError("measured calls: need at least 3 shapes for each pass and mask to fit kernel laws")
    arrays = {k: tuple(np.array(col, dtype=np.float64) for col in zip(*v, strict=True)) for k, v in groups.items()}

    def unit(pass_):
        return 4.0 * q_heads * head_dim * (BWD_FLOPS_FACTOR if pass_ == "bwd" else 1.0) / (peak_tflops * 1e12)

    launches = [_solve(*arrays[k], unit(k[0]), None)[2] for k in sorted(arrays)]
    launch = max(float(np.mean(launches)), 0.0)
    laws = {}
    for key in sorted(arrays):
        work, rows, seconds = arrays[key]
        a, b, _ = _solve(work, rows, seconds, unit(key[0]), launch)
        if a <= 0:
            raise InputError(f"measured {key[0]} {key[1]} calls do not fit a positive efficiency")
        fitted = launch + unit(key[0]) * (a * work + b * rows)
        laws[key] = KernelLaw(max_efficiency=float(1 / a), row_overhead_keys=float(b / a), points=len(seconds),
                              max_rel_error=float(np.max(np.abs(fitted / seconds - 1))), sources=("measured",))
    return laws, launch
