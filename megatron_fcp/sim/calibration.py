"""Kernel-efficiency calibration of the cost model from published FlashAttention figures (no GPU needed).

The fixed utilisations of a hardware profile (60% forward, 45% backward of peak) ignore that attention kernels
are slow on short sequences. This module fits, per kernel family, pass (forward, backward) and mask (causal
diagonal, full), a two-parameter kernel time law to the H100 figures of the FlashAttention-2/3 papers
(``megatron_fcp/data/published/published_attention_h100.yaml``, every number with its source):

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
from megatron_fcp.planner.pairs import BWD_FLOPS_FACTOR, edge_pairs

PUBLISHED = "published_attention_h100.yaml"
PASSES = ("fwd", "bwd")
MASKS = ("full", "causal")


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
        return yaml.safe_load((resources.files("megatron_fcp") / "data" / "published" / PUBLISHED).read_text())
    return yaml.safe_load(Path(path).read_text())


def segment_work(pairs, num_q, num_k, num_segments, tile: int):
    """The cost model's work of a call from its totals: exact pairs plus the partly filled edge tiles of every
    segment (``tile / 2`` per query and key token, ``tile^2 / 4`` per segment)."""
    return pairs + edge_pairs(num_q + num_k, num_segments, tile)


def call_work(q_lens, k_lens, causal: bool, tile: int) -> tuple[float, float, float]:
    """(exact pairs, model work pairs, query rows) of one varlen call: causal segments are diagonal blocks
    (``n (n + 1) / 2`` pairs), full ones ``q k``."""
    if len(q_lens) != len(k_lens):
        raise InputError(f"{len(q_lens)} query segments but {len(k_lens)} key segments")
    exact = sum(q * (q + 1) / 2 if causal else float(q * k) for q, k in zip(q_lens, k_lens, strict=True))
    rows = float(sum(q_lens))
    return exact, segment_work(exact, rows, sum(k_lens), len(q_lens), tile), rows


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


def benchmark_shape(seqlen: int, causal: bool, tile: int, total_tokens: int = 16384) -> tuple[float, float, float]:
    """(papers' pairs, model work pairs, query rows) of one published benchmark call, per head: ``16384 / L``
    sequences of ``L`` tokens. The papers count ``L^2`` pairs per sequence, ``L^2 / 2`` when causal; the model
    counts exact pairs plus edge tiles (a causal sequence is one diagonal segment)."""
    batch = total_tokens // seqlen
    _, work, rows = call_work([seqlen] * batch, [seqlen] * batch, causal, tile)
    return batch * seqlen * seqlen / (2 if causal else 1), work, rows


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


def _fit(work, rows, seconds, unit, launch_s, sources) -> KernelLaw:
    """The law of :func:`_solve` at a fixed ``launch_s``, with its worst relative error on ``seconds``."""
    a, b, launch = _solve(work, rows, seconds, unit, launch_s)
    if a <= 0:
        raise InputError("the timings do not fit a positive efficiency")
    fitted = launch + unit * (a * work + b * rows)
    return KernelLaw(max_efficiency=float(1 / a), row_overhead_keys=float(b / a), points=len(seconds),
                     max_rel_error=float(np.max(np.abs(fitted / seconds - 1))), sources=tuple(sources))


def _flops_unit(pass_: str, q_heads, head_dim, peak_tflops: float):
    """Seconds per pair of work at peak: ``4 h d`` FLOPs forward, 2.5 times that backward."""
    return 4.0 * q_heads * head_dim * (BWD_FLOPS_FACTOR if pass_ == "bwd" else 1.0) / (peak_tflops * 1e12)


def fit_law(rows: list[dict], causal: bool, peak_tflops: float, launch_s: float, tile: int) -> KernelLaw:
    """Least-squares fit of ``max_efficiency`` and ``row_overhead_keys`` to published rows (relative error of the
    call's time, ``launch_s`` included and fixed)."""
    if len(rows) < 2:
        raise InputError(f"{len(rows)} published figures: need at least 2 to fit a kernel law")
    shapes = np.array([benchmark_shape(r["seqlen"], causal, tile) for r in rows])
    unit = np.array([_flops_unit(r["pass"], r.get("nheads", 16), r["head_dim"], peak_tflops) for r in rows])
    seconds = shapes[:, 0] * unit * peak_tflops / np.array([r["tflops"] for r in rows])  # papers' FLOPs / rate
    return _fit(shapes[:, 1], shapes[:, 2], seconds, unit, launch_s, sorted({r["source"] for r in rows}))


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

    def seconds(pass_, mask, q_lens, k_lens):
        _, work, rows = call_work(q_lens, k_lens, mask == "causal", tile)
        return float(law_seconds(laws[pass_, mask], pass_, work, rows, flops_per_pair, peak_tflops, launch_s))

    single = ring = 0.0
    for lens in RING_FLASH_ATTENTION_VARLEN:
        halves = [n // 2 for n in lens]
        for pass_ in PASSES:
            diagonal = seconds(pass_, "causal", lens, lens)
            single += diagonal
            ring += diagonal + (world - 1) * max(seconds(pass_, "full", lens, halves),  # a source before the rank
                                                 seconds(pass_, "full", [n - h for n, h in zip(lens, halves,
                                                                                               strict=True)], lens))
    n = len(RING_FLASH_ATTENTION_VARLEN)
    return RingAnchor(single_iter_s=n / single, ring_iter_s=n / ring, ratio=world * single / ring)


def derive_causal_backward(laws: dict[tuple[str, str], KernelLaw], reference: dict[tuple[str, str], KernelLaw]
                           ) -> KernelLaw:
    """A causal backward law for a kernel whose paper publishes none (FlashAttention-3): its full backward law
    scaled by the ``reference`` kernel's causal-over-full ratios (FlashAttention-2's, whose causal backward is
    derived from its paper's figures): ``max_efficiency`` by the ratio of efficiencies, ``row_overhead_keys`` by
    the ratio of per-row costs. Derived, not fitted: ``points`` 0, the error of the full law."""
    full, ref_full, ref_causal = laws["bwd", "full"], reference["bwd", "full"], reference["bwd", "causal"]
    return KernelLaw(max_efficiency=full.max_efficiency * ref_causal.max_efficiency / ref_full.max_efficiency,
                     row_overhead_keys=full.row_overhead_keys * ref_causal.row_overhead_keys
                     / ref_full.row_overhead_keys, points=0, max_rel_error=full.max_rel_error,
                     sources=(*full.sources, *(f"ratio:{s}" for s in ref_causal.sources + ref_full.sources)))


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
            work = segment_work(r["pairs"], r["num_q"], r["num_k"], r["num_segments"], tile)
        mask = "causal" if r["causal"] else "full"
        for pass_ in PASSES:
            groups.setdefault((pass_, mask), []).append((work, rows, r[f"{pass_}_ms"] * 1e-3))
    if len(groups) < 4 or min(len(v) for v in groups.values()) < 3:
        raise InputError("measured calls: need at least 3 shapes for each pass and mask to fit kernel laws")
    arrays = {k: tuple(np.array(col, dtype=np.float64) for col in zip(*v, strict=True)) for k, v in groups.items()}

    first = {k: _solve(*arrays[k], _flops_unit(k[0], q_heads, head_dim, peak_tflops), None)[2] for k in arrays}
    launch = max(float(np.mean(list(first.values()))), 0.0)
    laws = {key: _fit(*arrays[key], _flops_unit(key[0], q_heads, head_dim, peak_tflops), launch, ("measured",))
            for key in sorted(arrays)}
    return laws, launch
