"""Fit the cost model's kernel time laws to the published H100 FlashAttention figures (no GPU).

    .venv/bin/python scripts/calibrate_published.py  # writes megatron_fcp/data/kernel_laws/h100_published_*.yaml
                                                     # and docs/calibration_published.md

For FlashAttention-2 (PyTorch's built-in kernels and flash-attn 2: what this project's `torch-flash` and
`flash-attn` backends run) and FlashAttention-3, per pass and mask: the fitted law, its error on the figures,
the figures beside the law; then ring-flash-attention's published varlen benchmark modeled with the FA2 laws
(kernel time only). See megatron_fcp/sim/calibration.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_fcp.sim.calibration import (
    MASKS,
    PASSES,
    benchmark_shape,
    derive_causal_backward,
    fit_kernel,
    law_seconds,
    load_published,
    published_points,
    ring_flash_attention_anchor,
    to_yaml,
)
from megatron_fcp.sim.model import load_hardware

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", nargs="+", default=[str(REPO / "megatron_fcp/data/kernel_laws")],
                   help="folders to write the calibration files to (the shipped one is what the cost model loads)")
    p.add_argument("--out-doc", default=str(REPO / "docs/calibration_published.md"))
    args = p.parse_args()
    hw = load_hardware("h100_node")
    peak, launch, tile = hw.peak_bf16_dense_tflops, hw.kernel_launch_us / 1e6, hw.tile_size
    data = load_published()
    lines = ["# Kernel time laws fitted to published H100 figures (no GPU)", "",
             "Command: `.venv/bin/python scripts/calibrate_published.py`. Law per call: `seconds = launch + "
             "flops_per_pair x (edge_pairs + row_overhead_keys x query_rows) / (peak x max_efficiency)` "
             f"(launch {hw.kernel_launch_us:g} us and tile {tile} from h100_node.yaml, peak {peak} TFLOP/s). "
             "Figures from megatron_fcp/data/published/published_attention_h100.yaml (sources there); "
             "FA2's causal backward is derived from the FA2 paper's forward + backward figure (read from its "
             "image) and the FA3 paper's FA2 forward figure.", ""]
    for kernel in ("fa2", "fa3"):
        laws = fit_kernel(data, kernel, peak, launch, tile)
        note = (f"{kernel} kernel time laws fitted by scripts/calibrate_published.py to published H100 figures "
                "(megatron_fcp/data/published/published_attention_h100.yaml); modeled, not measured here")
        for folder in args.out:
            path = Path(folder) / f"h100_published_{kernel}.yaml"
            path.write_text(f"# {note}\n" + to_yaml(kernel, laws, note))
        lines += [f"## {kernel} ({path.relative_to(REPO) if path.is_relative_to(REPO) else path})", "",
                  "| pass | mask | max efficiency | row overhead (keys) | figures | worst error | sources |",
                  "|---|---|---|---|---|---|---|"]
        for (pass_, mask), law in sorted(laws.items()):
            lines.append(f"| {pass_} | {mask} | {law.max_efficiency:.3f} | {law.row_overhead_keys:.0f} | "
                         f"{law.points} | {100 * law.max_rel_error:.1f}% | {', '.join(law.sources)} |")
        missing = [f"{p} {m}" for p in PASSES for m in MASKS if (p, m) not in laws]
        lines += ["", f"Not published (no law): {', '.join(missing) or 'none'}.", ""]
        for (pass_, mask), law in sorted(laws.items()):
            rows = published_points(data, kernel, pass_, mask == "causal")
            cells = []
            for r in rows:
                paper, work, q_rows = benchmark_shape(r["seqlen"], mask == "causal", tile)
                fpp = 4 * r.get("nheads", 16) * r["head_dim"]
                t = law_seconds(law, pass_, work, q_rows, fpp, peak, launch)
                model = paper * fpp * (2.5 if pass_ == "bwd" else 1) / t / 1e12
                cells.append(f"{r['seqlen']}: {r['tflops']:.0f} / {model:.0f}")
            lines.append(f"- {pass_} {mask}, TFLOP/s published / law: " + ", ".join(cells))
        lines.append("")
    fa3 = fit_kernel(data, "fa3", peak, launch, tile)
    fa3[("bwd", "causal")] = derive_causal_backward(fa3, fit_kernel(data, "fa2", peak, launch, tile))
    note = ("fa3 kernel time laws fitted by scripts/calibrate_published.py to published H100 figures "
            "(megatron_fcp/data/published/published_attention_h100.yaml), and a causal backward law derived from "
            "them (FA3's full backward law times FA2's causal/full ratios: the FA3 paper publishes no causal "
            "backward figure); modeled, not measured here")
    for folder in args.out:
        path = Path(folder) / "h100_published_fa3_derived.yaml"
        path.write_text(f"# {note}\n" + to_yaml("fa3", fa3, note))
    law = fa3["bwd", "causal"]
    lines += ["## fa3 with a derived causal backward law (megatron_fcp/data/kernel_laws/h100_published_fa3_derived"
              ".yaml)", "",
              "The FA3 paper publishes no causal backward figure. For the profile `h100_node_fa3_published` "
              "(MagiAttention's benchmark ran FA3) the law is derived, not fitted: FA3's full backward law with "
              "FA2's causal/full ratios (efficiency x "
              f"{law.max_efficiency / fa3['bwd', 'full'].max_efficiency:.3f}, per-row cost x "
              f"{law.row_overhead_keys / fa3['bwd', 'full'].row_overhead_keys:.3f}): max efficiency "
              f"{law.max_efficiency:.3f}, row overhead {law.row_overhead_keys:.0f} keys. The other three laws are "
              "the fitted ones above.", ""]
    anchor = ring_flash_attention_anchor(fit_kernel(data, "fa2", peak, launch, tile), peak, launch, tile)
    lines += ["## ring-flash-attention's varlen benchmark, modeled with the fa2 laws (kernel time only)", "",
              "8 GPUs x 8192 tokens, causal, 32/8 heads of 128, forward + backward, the 4 document layouts its "
              "benchmark cycles through; published on 8 x H800, modeled with the H100 laws (the H800 is an H100 "
              "SXM with less NVLink bandwidth; equal tensor-core peak assumed, not checked here).", "",
              "| figure | published | modeled (kernels only) |", "|---|---|---|",
              f"| single GPU flash_attn_varlen, iter/s | 225.4 | {anchor.single_iter_s:.1f} |",
              f"| zigzag ring, iter/s | 21.4 | {anchor.ring_iter_s:.1f} |",
              f"| ring / ideal (single / 8) | 75.9% | {100 * anchor.ratio:.1f}% |", "",
              "The single-GPU figure, which the laws were not fitted to, is within "
              f"{100 * abs(anchor.single_iter_s / 225.4 - 1):.1f}% of the published one. The ring's kernels alone "
              "run at or above the ideal (its steps after the first are full-mask calls, which the laws make "
              "faster than causal ones), so the 24% the published ring loses is not kernel efficiency: it is "
              "merging partial outputs, accumulating gradients and communication, which these laws do not "
              "model. Reproducing 75.9% within 10% needs those terms (not done yet)."]
    Path(args.out_doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
