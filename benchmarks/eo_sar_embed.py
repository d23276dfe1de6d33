"""``eo-sar embed`` at scale: peak memory against scene size, and windows/s against the bare model.

For each scene size (default 2048², 4096², 8192² px; 13-band uint16, 256-px tiles, deflate, written
tile by tile into a temp folder, deleted after its size) a FRESH subprocess builds the model, warms
it up, resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` 5), runs the job (the
functions ``eo-sar embed`` runs, no MLflow: usable on hosts without it), and reports

- ``rss_growth_mb``: RSS high-water mark during the job minus RSS before it (CPU memory the job
  added), and on CUDA ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated`` during the job);
- ``job_wps``: windows/s of the whole job (output file, reading, normalising, model, writing, preview);
- ``loop_wps``: windows/s of its steady-state loop alone (the tile rows: reading, normalising, model,
  projection; not the output file's creation, the per-row writes nor the preview), which is what
  a large scene's job tends to;
- ``model_wps``: windows/s of the same model, batch size and precision on random tensors already
  on the device (the ceiling), ``--model-batches`` batches timed half just before and half just
  after the job (a shared machine's load then weighs on both alike);
- ``reader_wps``: windows/s the job's loop delivers with NO model (a stand-in encoder returning
  zeros: reading, decoding, normalising, nodata masks, batching, the output buffer), with 1 and
  with ``--reader-threads`` threads (``eo-sar embed --reader-threads``): the most any model, e.g.
  a GPU's, could be fed on this machine (scene file in the page cache: decoding, not the disk);
- ``decode_wps``: the same number of windows per second of decoding each tile of the scene once
  (plain rasterio reads of whole block rows): the reader's own ceiling; reader / decode is the
  reader's efficiency;
- ``load``: the 1-minute load average before and after (the machine may be shared).

Targets (ratios): memory growth at the largest size <= 1.2 x at the smallest; job_wps / model_wps
>= 0.85. The default CPU run (ViT-S/14 with 2 blocks at 112 px windows) takes about 5-7 minutes on 2
idle cores; ``--depth 12 --window 224 --device cuda --reader-threads 8`` measures the full model on
a GPU.

    python benchmarks/eo_sar_embed.py [--sizes 2048 4096 8192] [--device cpu|cuda] [--window 112]
                                      [--batch-size 32] [--depth 2] [--precision 32-true]
                                      [--reader-threads N] [--memory-only] [--json OUT] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(args):
    import torch

    from domainfm.backbones import InputSpec, create_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    torch.manual_seed(0)
    b = create_backbone(args.backbone, in_chans=13, img_size=args.window, init="random", depth=args.depth)
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=(1500.0,) * 13, std=(600.0,) * 13, modality="s2",
                             gsd_m=10.0, units="reflectance x 10000")
    return b


class _NoModel:
    """Stands in for the model in the reader-only figure: zeros of the pooled feature's shape."""

    def __init__(self, device, dim: int) -> None:
        self.device, self.dim = device, dim

    def __call__(self, windows):
        import numpy as np

        return np.zeros((len(windows), self.dim), dtype=np.float32)


def reader_only(sp, s, device, dim: int, threads: int) -> float:
    """Windows/s of the job's tile-row loop over the whole scene with no model (``threads`` readers)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from plugins.eo_sar import scene_embedding as se

    s = dataclasses.replace(s, reader_threads=threads)
    res = se.SceneResult(str(sp.path), "", (dim, *sp.grid.out_shape))
    t = time.perf_counter()
    with se._bounded_cache(sp), ThreadPoolExecutor(max_workers=1) as pool:
        for row in range(sp.grid.tile_rows):
            se._tile_row(sp, s, _NoModel(device, dim), row, dim, lambda f: f, pool, res)
    sp.close()
    return (res.embedded + res.skipped_nodata) / (time.perf_counter() - t)


def decode_only(path, window: int, stride: int) -> float:
    """Windows/s (as many as the job's grid has) of decoding every tile of the scene exactly once:
    plain rasterio reads of whole block rows, GDAL's threads as the job's reader has them. The
    ceiling of ``reader_wps`` on this machine: what is left is the reader's own cost."""
    import math

    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path, NUM_THREADS="ALL_CPUS") as src:
        H, W = src.height, src.width
        bh = src.block_shapes[0][0]
        t = time.perf_counter()
        for y in range(0, H, bh):
            src.read(window=Window(0, y, W, min(bh, H - y)))
        dt = time.perf_counter() - t
    n = (math.ceil((H - window) / stride) + 1) * (math.ceil((W - window) / stride) + 1)
    return n / dt


def child(args) -> dict:
    """One size in this (fresh) process; prints a JSON line."""
    import torch

    from plugins.eo_sar import scene_embedding as se
    from plugins.eo_sar.scene_embedding import (SceneEmbedSettings, WindowEncoder, embed_scene, prepare,
                                                resolve_device)

    torch.set_num_threads(args.threads) if args.threads else None
    out = Path(args.tmp) / f"out_{args.size}"
    s = SceneEmbedSettings(out_dir=str(out), model=f"benchmark {args.backbone} depth {args.depth}", window=args.window,
                           batch_size=args.batch_size, precision=args.precision,
                           accelerator="gpu" if args.device == "cuda" else "cpu", progress=False,
                           reader_threads=args.job_reader_threads)
    load0 = os.getloadavg()[0]
    job = prepare([args.scene], s, backbone=_build(args))
    device = resolve_device(s.accelerator)
    enc = WindowEncoder(job.backbone, device, s.precision)
    x = torch.randn(args.batch_size, 13, args.window, args.window, device=device)
    for _ in range(3):  # warm-up: kernels, allocator, rasterio/GDAL opened once
        enc.forward(x)
    from concurrent.futures import ThreadPoolExecutor

    sp = job.scenes[0]
    sp.read_chunk(0, 0, min(args.batch_size, sp.grid.cols), s)
    import matplotlib.pyplot  # noqa: F401  (the preview's one-off import is not the job's memory)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # the bare model on tensors already on the device, timed half before and half after the job: on a
    # machine shared with other work the load changes, and bracketing the job averages it out
    n_side = max(1, args.model_batches // 2)

    def bare(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            enc.forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    model_s = bare(n_side)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    loop = {"s": 0.0}
    tile_row = se._tile_row

    def timed_tile_row(*a, **k):  # the steady-state loop: the time spent in the tile rows
        t = time.perf_counter()
        out = tile_row(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loop["s"] += time.perf_counter() - t
        return out

    se._tile_row = timed_tile_row
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        res = embed_scene(sp, s, enc, dim_in=job.dim_in, pool=pool)
    if device.type == "cuda":
        torch.cuda.synchronize()
    job_s = time.perf_counter() - t0
    se._tile_row = tile_row
    peak = _status("VmHWM")
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    model_s += bare(n_side)
    n_batches = 2 * n_side
    threads = args.reader_threads or os.cpu_count() or 1
    reader, decode = {}, float("nan")
    if not args.memory_only:
        reader["1"] = reader_only(sp, s, device, job.dim_in, 1)
        if threads > 1:
            reader[str(threads)] = reader_only(sp, s, device, job.dim_in, threads)
        decode = decode_only(sp.path, sp.grid.window, sp.grid.stride)
    return {"size": args.size, "windows": res.embedded, "decode_wps": decode, "job_s": round(job_s, 3), "loop_s": round(loop["s"], 3),
            "job_wps": res.embedded / job_s, "loop_wps": res.embedded / loop["s"],
            "model_wps": n_batches * args.batch_size / model_s, "reader_wps": reader,
            "job_reader_threads": s.reader_threads_for(device),
            "rss_before_mb": round(base, 1), "rss_growth_mb": round(peak - base, 1),
            "cuda_peak_mb": None if cuda_peak is None else round(cuda_peak, 1), "output": res.path,
            "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--depth", type=int, default=2, help="ViT blocks (12: the full ViT-S)")
    p.add_argument("--window", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-batches", type=int, default=16, help="batches of the bare-model timing (half before, "
                                                                   "half after the job)")
    p.add_argument("--reader-threads", type=int, default=0,
                   help="threads of the reader-only figure's second run (0: the CPU count; the first uses 1)")
    p.add_argument("--job-reader-threads", type=int, default=0,
                   help="--reader-threads of the job itself (0: the command's default: 1 on CPU, 8 on a GPU)")
    p.add_argument("--memory-only", action="store_true", help="skip the reader-only and decode-only figures")
    p.add_argument("--json", default=None, help="Write the figures here too.")
    p.add_argument("--tmp", default=None, help="Folder for the scenes (default: a temp folder)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scene", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return {}

    sys.path.insert(0, str(REPO / "tests" / "data" / "eo_sar"))
    import make_data

    t_start = time.perf_counter()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="eo_sar_embed_bench_") if args.tmp is None else None
    tmp = Path(args.tmp or tmp_ctx.name)
    rows = []
    try:
        for size in args.sizes:
            t0 = time.perf_counter()
            scene = make_data.write_scene(tmp / f"scene_{size}.tif", height=size, width=size, nodata_box=None,
                                          tiled=True, seed=size)
            gen_s = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--_child", "--size", str(size), "--scene", str(scene), "--tmp", str(tmp),
                   "--device", args.device, "--backbone", args.backbone, "--depth", str(args.depth),
                   "--window", str(args.window), "--batch-size", str(args.batch_size), "--precision", args.precision,
                   "--threads", str(args.threads), "--model-batches", str(args.model_batches),
                   "--reader-threads", str(args.reader_threads), "--job-reader-threads", str(args.job_reader_threads)]
            cmd += ["--memory-only"] if args.memory_only else []
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
            finally:  # an 8192² scene is ~1.4 GB: never left behind
                scene.unlink(missing_ok=True)
                shutil.rmtree(tmp / f"out_{size}", ignore_errors=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                sys.exit(f"size {size} failed:\n{r.stderr[-3000:]}")
            row = json.loads(line[0][7:])
            row["generate_s"] = round(gen_s, 1)
            rows.append(row)
            readers = ", ".join(f"{k} thread(s) {v:.0f}" for k, v in row["reader_wps"].items())
            print(f"{size:>6}² px: {row['windows']:>6} windows, model {row['model_wps']:.1f} win/s; whole job "
                  f"{row['job_wps']:.1f} win/s (ratio {row['job_wps'] / row['model_wps']:.2f}), its loop "
                  f"{row['loop_wps']:.1f} win/s (ratio {row['loop_wps'] / row['model_wps']:.2f}); reader alone: "
                  f"{readers} win/s (decoding alone {row['decode_wps']:.0f}); RSS growth {row['rss_growth_mb']:.1f} MiB"
                  + (f", CUDA peak {row['cuda_peak_mb']:.1f} MiB" if row['cuda_peak_mb'] is not None else "")
                  + f"; load {row['load_1min'][0]:.1f} -> {row['load_1min'][1]:.1f}", flush=True)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    small, large = rows[0], rows[-1]
    summary = {
        "device": args.device, "backbone": args.backbone, "depth": args.depth, "window": args.window,
        "batch_size": args.batch_size, "precision": args.precision, "rows": rows,
        "rss_growth_ratio_largest_to_smallest": large["rss_growth_mb"] / max(small["rss_growth_mb"], 1e-9),
        "cuda_peak_ratio_largest_to_smallest": (large["cuda_peak_mb"] / small["cuda_peak_mb"]
                                                if small["cuda_peak_mb"] else None),
        "throughput_ratio_min": min(r["job_wps"] / r["model_wps"] for r in rows),
        "throughput_ratio_largest": large["job_wps"] / large["model_wps"],
        "loop_ratio_min": min(r["loop_wps"] / r["model_wps"] for r in rows),
        "loop_ratio_largest": large["loop_wps"] / large["model_wps"],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(f"memory: RSS growth {large['size']}² / {small['size']}² = {summary['rss_growth_ratio_largest_to_smallest']:.2f} "
          "(target <= 1.2)" + (f"; CUDA peak ratio {summary['cuda_peak_ratio_largest_to_smallest']:.2f}"
                               if summary["cuda_peak_ratio_largest_to_smallest"] else ""))
    print(f"throughput: job / model windows/s = {summary['throughput_ratio_largest']:.2f} at {large['size']}² "
          f"(lowest {summary['throughput_ratio_min']:.2f}; target >= 0.85); steady-state loop / model = "
          f"{summary['loop_ratio_largest']:.2f} (lowest {summary['loop_ratio_min']:.2f}); {summary['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
