"""Time training steps and split them into their parts; writes nothing to a run folder.

    python tools/bench_step.py                           # train.py's defaults: the embedded data
    python tools/bench_step.py --steps 50 --mode xid     # any train.py flag, and --steps
    python tools/bench_step.py @configs/paper.txt --data-root /data/k400_128 --batch-size 64

The parts are those of train.py's loop, in its order, each ended by a device sync: data (the wait
for the loader and the copy to the device), transforms (jitter, normalisation, log-mel), forward,
loss, backward (with the optimiser's step) and bank update. Prints medians over --steps steps
after 5 untimed ones, the share of the total time spent waiting for data (overall, and in each
half of the steps: an epoch's start, with its empty loader queue, shows in one half only), the
peak memory, and the model FLOPs utilisation: the FLOPs of one forward and backward of the encoders
are counted once by torch.utils.flop_counter (convolutions and matrix products, 2 per
multiply-add), divided by the median step, and by the GPU's peak (--peak-tflops, or the datasheet's
dense bf16 figure for the GPUs in PEAK_TFLOPS).
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
import train  # noqa: E402

PARTS = ("data", "transforms", "forward", "loss", "backward", "bank")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), matched to
# torch.cuda.get_device_name(); another GPU needs --peak-tflops.
PEAK_TFLOPS = {"H200 NVL": 836.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0}


def count_flops(run, batch):
    """FLOPs of one forward and backward of the encoders on this batch's shape (the loss and the
    transforms are left out: a few MFLOPs against GFLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = run.device
    video, audio = batch["video"].to(device), batch["audio"].to(device)
    video, audio = run.transforms.video(video, batch["jitter"]), run.transforms.audio(audio)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            v, a = run.model(video, audio)
        (v.float().sum() + a.float().sum()).backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench(run, args, steps):
    """{part: [seconds of each timed step]} over `steps` steps after 5 untimed ones."""
    device = run.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in PARTS}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches, n = iter(run.loader), 0
    run.model.train()
    while n < steps + 5:
        t = [time.perf_counter()]

        def done():  # the part just run ends here
            sync()
            t.append(time.perf_counter())

        batch = next(batches, None)
        if batch is None:  # an epoch ended: the next one starts with an empty queue
            batches = iter(run.loader)
            continue
        if not train.distributed.every_rank_has_data(len(batch["index"]) >= train.MIN_CLIPS,
                                                     device, run.world):
            continue
        index = batch["index"].to(device, non_blocking=True)
        video, audio = batch["video"].to(device, non_blocking=True), batch["audio"].to(device)
        done()
        video, audio = run.transforms.video(video, batch["jitter"]), run.transforms.audio(audio)
        done()
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            v, a = run.ddp(video, audio)
        done()
        loss, diag = run.criterion(v, a, index)
        train.stop_if_not_finite(loss, diag, f"bench step {n}")
        done()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        done()
        run.criterion.bank.update(index, v, a)
        done()
        if n >= 5:
            for name, t0, t1 in zip(PARTS, t, t[1:]):
                times[name].append(t1 - t0)
        n += 1
    return times


def report(times, run, args, flops=None, peak=None):
    """Print the medians, the data wait and the utilisation; return them as a dict
    (tools/gpu_check.py reads it)."""
    med = {k: float(np.median(v)) for k, v in times.items()}
    step = sum(med.values())
    total = lambda s=slice(None): sum(sum(v[s]) for v in times.values())  # noqa: E731
    wait_of_total = sum(times["data"]) / total()  # a slow batch now and then counts here
    half = len(times["data"]) // 2
    halves = [sum(times["data"][s]) / max(total(s), 1e-12)
              for s in (slice(0, half), slice(half, None))]
    batch = run.loader.batch_size * run.world
    print(f"bench: {len(times['data'])} steps, batch {batch}, {args.mode}/{args.strategy}, "
          f"K={run.criterion.K}, {args.video_arch}+{args.audio_arch}, "
          f"{args.frames}x{args.crop}x{args.crop}, device {run.device} (the bank update is timed "
          f"after each step; with --bank-refresh epoch train.py does it at the epoch's end)")
    print(f"  clips/s {batch / step:.1f}   data-wait fraction {med['data'] / step:.3f}   "
          f"step {1e3 * step:.1f} ms (medians; data wait of the total time {wait_of_total:.3f}: "
          f"{halves[0]:.3f} in the first half of the steps, {halves[1]:.3f} in the second)")
    print("  " + "  ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()))
    achieved = flops / step / 1e12 if flops else None
    mfu = achieved / peak if achieved and peak else None
    if flops:
        print(f"  model FLOPs a step {flops / 1e9:.1f} GFLOP (forward + backward, counted); "
              f"achieved {1e3 * achieved:.1f} GFLOP/s"
              + (f", model FLOPs utilisation {mfu:.1%} of {peak:g} TFLOP/s" if mfu else
                 " (no peak known for this device: --peak-tflops)"))
    if run.device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        # ru_maxrss is in KiB on Linux, in bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**(30 if sys.platform == "darwin" else 20)
        print(f"  peak process memory (RSS) {rss:.2f} GiB")
    return {"median": med, "data_wait_of_total": wait_of_total, "data_wait_halves": halves,
            "clips_per_s": batch / step, "flops": flops, "tflops": achieved, "mfu": mfu,
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda"
                                else None)}


def main(argv=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=int, default=30, help="steps timed, after 5 untimed ones")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak")
    own, rest = p.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):  # this tool's own words first, then train.py's flags
        print(__doc__ + "\n--steps N   steps timed, after 5 untimed ones (default 30)"
              "\n--peak-tflops X   the device's peak TFLOP/s for the utilisation\n")
    if own.steps < 1:
        p.error(f"--steps must be >= 1, got {own.steps}")
    with tempfile.TemporaryDirectory() as out:  # train.py's checks want a run folder (left empty)
        parser, args = train.get_args(["--out", out, "--no-eval", *rest])
        run = train.set_up(parser, args, write=False)
        times = bench(run, args, own.steps)
        flops = count_flops(run, next(iter(run.loader)))
        return report(times, run, args, flops, peak_tflops(run.device, own.peak_tflops))


if __name__ == "__main__":
    main(sys.argv[1:])
