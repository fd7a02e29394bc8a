"""Kernel laws fitted to the kernel calls scripts/gpu_perf.py measured on a GPU (its ``*_kernels.json``).

    .venv/bin/python scripts/fit_measured.py docs/gpu/2026-12-01_h200_kernels.json [--name h200_measured_torch_flash]

Fits megatron_fcp.sim.calibration.fit_calls to every measured call (calibration grid and replayed shapes, forward
and backward), writes the laws as NAME.yaml and a profile NAME_node.yaml (h200_node with these laws and the
fitted launch cost) into the package (megatron_fcp/data/kernel_laws/ and megatron_fcp/data/hardware/), or both
into one folder with ``--out DIR``, and prints the fit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_fcp.sim.calibration import fit_calls, to_yaml

REPO = Path(__file__).resolve().parents[1]


def records_of(kernels: dict) -> list[dict]:
    """Every measured call of a ``*_kernels.json`` as a fit record (calls that failed are left out)."""
    columns = kernels["replay_columns"]
    out = []
    for row in kernels["replay"]:
        r = dict(zip(columns, row, strict=True))
        if r.get("fwd_ms") and r.get("bwd_ms"):
            out.append({k: r[k] for k in ("causal", "pairs", "num_q", "num_k", "num_segments", "fwd_ms", "bwd_ms")})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", type=Path)
    p.add_argument("--name", default="h200_measured_torch_flash")
    p.add_argument("--base-profile", default="h200_node")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--out", type=Path, default=None,
                   help="one folder for the laws and the profile (default: the package's kernel_laws/ and hardware/)")
    args = p.parse_args(argv)
    kernels = json.loads(args.kernels.read_text())
    cfg = kernels["config"]
    records = records_of(kernels)
    laws, launch = fit_calls(records, cfg["peak_tflops"], cfg["q_heads"], cfg["head_dim"], args.tile)
    note = (f"kernel laws fitted by scripts/fit_measured.py to {len(records)} calls measured on {kernels['device']} "
            f"({args.kernels.name}, torch {kernels.get('torch')}, backend {cfg.get('backend')}, {cfg['dtype']}); "
            f"launch cost {launch * 1e6:.1f} us")
    base = (REPO / "megatron_fcp/data/hardware" / f"{args.base_profile}.yaml").read_text()
    profile = (f"# {args.base_profile} with kernel time laws measured on the GPU ({args.name}.yaml: {note}).\n"
               + base.replace(f"name: {args.base_profile} ", f"name: {args.name}_node ", 1))
    profile = profile.replace("kernel_launch_us: 10  # modeled fixed cost of one attention kernel call, microseconds",
                              f"kernel_launch_us: {launch * 1e6:.2f}  # fitted to the measured calls")
    laws_line = f"kernel_laws: {args.name}  # measured laws (next to this file, or shipped)\n"
    profile = profile.replace("tile_size:", laws_line + "tile_size:", 1)
    data = REPO / "megatron_fcp/data"
    laws_dir, profile_dir = (args.out, args.out) if args.out else (data / "kernel_laws", data / "hardware")
    (laws_dir / f"{args.name}.yaml").write_text(f"# {note}\n" + to_yaml("measured", laws, note))
    (profile_dir / f"{args.name}_node.yaml").write_text(profile)
    print(note)
    for (pass_, mask), law in sorted(laws.items()):
        print(f"{pass_} {mask}: max efficiency {law.max_efficiency:.3f}, row overhead {law.row_overhead_keys:.0f} "
              f"keys, {law.points} calls, worst error {100 * law.max_rel_error:.1f}%")


if __name__ == "__main__":
    main()
