"""Where a full-size frame's render time goes, per kind of op (torch.profiler), for one renderer mode.

    python bench/render_profile.py [--mode frozen|compile|eager] [--precision bf16|fp32] [--threads 1]
                                   [--upsampling subpixel|transposed] [--frames 5]

Full-size Stage1 with generated (random) weights, the bundled portrait. "frozen" is what --fast compiles
where bf16 is native (avatar.pipeline.compile_frozen, constant kernels); "compile" the plain torch.compile;
"eager" no compile. Compiled kernels are profiled by name (inductor's enable_kernel_profile), so the table
splits convolutions by shape from the fused elementwise kernels, the grid_sample warps and the copies. Self
times are summed per category over --frames frames and divided by the frame count. Writes JSON
(bench/results/render_profile.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.pipeline import compile_frozen, cpu_name  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from models.stage1 import Stage1  # noqa: E402


def category(name: str, shapes) -> str:
    """One row of the table for a profiler event: convolutions by kernel shape, compiled kernels by the
    ATen ops they fuse."""
    if "conv" in name and shapes and len(shapes) > 1 and len(shapes[1]) == 4:
        o, i, kh, _ = shapes[1]
        if i == 1:
            return "blur / upsample (depthwise FIR)"
        if kh == 1:
            return "1x1 conv"
        if kh == 2:
            return "upsampling conv (sub-pixel 2x2)"
        if "transpose" in name or shapes[0][1] == o != i:   # conv_transpose2d weights are (I, O, k, k)
            return "upsampling conv (transposed 3x3)"
        return f"conv {kh}x{kh}"
    if name.startswith("graph_") or "cpp_fused" in name:
        if "grid_sampler" in name:
            return "grid_sample warp (+ fused elementwise)"
        if "pixel_shuffle" in name or ("clone" in name and "permute" in name and "leaky" not in name):
            return "layout copies (shuffle, permute)"
        return "fused elementwise (inductor)"
    if name in ("aten::bmm", "aten::mm", "aten::addmm", "aten::matmul", "mkldnn::_linear_pointwise"):
        return "matmuls (styles, ToRGB/ToFlow 1x1)"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone"):
        return "copies / dtype casts"
    if name.startswith("aten::grid_sampler"):
        return "grid_sample warp (+ fused elementwise)"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="frozen", choices=["frozen", "compile", "eager"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--upsampling", default="subpixel", choices=Stage1.UPSAMPLING)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "render_profile.json"))
    args = p.parse_args()
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True      # compiled kernels appear in the profile by name
    inductor_config.cpp.descriptive_names = "original_aten"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s1 = Stage1().eval()
    s1.set_upsampling(args.upsampling)
    s1.set_constant_kernels(args.mode == "frozen")
    img = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    with torch.inference_mode():
        wa, alpha0, feats = s1.encode(img)
    alpha = alpha0 + 0.05
    fn = {"frozen": compile_frozen, "compile": lambda f: torch.compile(f, dynamic=False),
          "eager": lambda f: f}[args.mode](s1.render)

    def frame():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            return fn(wa, alpha, feats).float()

    for _ in range(3):                              # compile, oneDNN primitives, caches
        frame()
    times = []
    for _ in range(args.frames):
        t0 = time.perf_counter()
        frame()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(args.frames):
            frame()
    rows: dict = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages(group_by_input_shape=True):
        c = category(e.key, e.input_shapes)      # self times: a wrapper counts only its own overhead
        rows[c][0] += e.self_cpu_time_total / 1000 / args.frames
        rows[c][1] += e.count // args.frames
    total = sum(v[0] for v in rows.values())
    times.sort()
    med = 1000 * times[len(times) // 2]
    print(f"render profile: {args.mode}, {args.precision}, {args.upsampling}, {args.threads} thread(s), {cpu_name()}; "
          f"{med:.1f} ms/frame (median of {args.frames}, unprofiled), profiled self time {total:.1f} ms/frame; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| op kind | ms/frame | share | ops/frame |\n|---|---:|---:|---:|")
    for c, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"| {c} | {ms:.1f} | {ms / total:.0%} | {n} |")
    top = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:15]
    print("\nlargest single ops (ms/frame, input shapes):")
    for e in top:
        print(f"  {e.self_cpu_time_total / 1000 / args.frames:6.2f}  {e.key[:70]}  {e.input_shapes[:2]}")
    result = dict(bench="render_profile", mode=args.mode, precision=args.precision, upsampling=args.upsampling,
                  threads=args.threads, cpu=cpu_name(), torch=torch.__version__, ms_per_frame=med,
                  load=os.getloadavg()[0], rows={c: dict(ms_per_frame=v[0], ops_per_frame=v[1]) for c, v in rows.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
