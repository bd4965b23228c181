"""The CUDA path at the paper's scale, checked in one go: run it whenever a GPU is at hand.

    python tools/gpu_check.py              # on a GPU machine with 16 cores
    python tools/gpu_check.py --no-compile # without the torch.compile lever (minutes less)
    python tools/gpu_check.py --small      # the same steps at small settings, on any CPU (tested)

1. writes a YouTube-like source (tools/bench_decoding.py's) and prepares it (tools/prepare.py);
2. the levers, one at a time on top of the ones before: tools/bench_step.py with R(2+1)D-18 + the
   AVID audio net at 8 x 112^2, bf16, the machine's cores as loader workers, xID, then with
   --cudnn-benchmark, --channels-last, --fused-adam, --compile, and a batch of 128: clips/s, model
   FLOPs utilisation (FLOPs counted from the model), data wait, peak memory. A lever is kept for
   the next rows when it gained at least 3% clips/s. The timed steps stay inside one epoch (2,048
   files are 32 batches of 64): each epoch starts with the loader's queue empty;
3. xid against robust with the kept levers: Robust-xID's extra work (weights, soft targets);
4. a 2-epoch run on the prepared files, stopped after its first epoch and resumed (--resume);
5. the λ sweep of plots.py, its first --jobs points trained at once with the figures' recipe and
   evaluation (the embedded data), and the time Figures 1 and 2 would take at that pace.
It ends with the targets, each marked ok or MISSED: at least 1,000 clips/s, data wait below 5%,
robust at most 1.10x xid's step, the resumed run's epochs 1 and 2, Figures 1 and 2 within 15 min.
"""
import argparse
import gc
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
import bench_decoding  # noqa: E402
import bench_step  # noqa: E402
import listings  # noqa: E402
import embedded_dataset  # noqa: E402
import plots  # noqa: E402
import prepare  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

PAPER = ["--video-arch", "r2plus1d_18", "--audio-arch", "avid", "--frames", "8", "--fps", "16",
         "--crop", "112", "--audio-seconds", "2", "--sample-rate", "24000", "--batch-size", "64",
         "--amp", "bf16", "--num-negatives", "1024"]
SMALL = ["--frames", "4", "--fps", "8", "--crop", "32", "--audio-seconds", "1",
         "--sample-rate", "16000", "--batch-size", "8", "--amp", "off", "--num-negatives", "4"]
LEVERS = [("cuDNN autotuning", ["--cudnn-benchmark"]), ("channels-last 3-D", ["--channels-last"]),
          ("fused Adam", ["--fused-adam"]), ("torch.compile", ["--compile"]),
          ("batch 128", ["--batch-size", "128"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="small settings that run on a CPU in a minute")
    p.add_argument("--root", default="data/gpu_check",
                   help="where the source, its prepared copy and the run go")
    p.add_argument("--files", type=int, default=None,
                   help="YouTube-like files (default 2048; --small: 16)")
    p.add_argument("--bench-steps", type=int, default=None,
                   help="steps timed per mode, after 5 warm-up steps "
                        "(default 25: within one epoch; --small: 2)")
    p.add_argument("--workers", type=int, default=listings.available_cores(),
                   help="loader workers (default: all cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="try the torch.compile lever (it compiles for a minute or two)")
    p.add_argument("--jobs", type=int, default=None,
                   help="sweep points at once in part 5 (default 6; --small: 2)")
    args = p.parse_args(argv)
    files = args.files or (16 if args.small else 2048)  # 32 batches of 64 an epoch, K = 1024 < N
    steps = args.bench_steps or (2 if args.small else 25)
    root = Path(args.root)
    if files < 8:
        p.error(f"--files {files}: at least 8 (one batch of --small, "
                "and more videos than negatives)")
    if not args.small and not torch.cuda.is_available():
        p.error("no GPU here: run with --small to check the same steps on the CPU")

    # 640x360 rather than 720p, 4 s rather than 10, to write the source in minutes; what prepare
    # buys on 720p is tools/bench_decoding.py's to measure, and the GPU reads the prepared copy
    print(f"== 1. a YouTube-like source of {files} files, prepared")
    resolution = (96, 64) if args.small else (640, 360)
    seconds = 3.0 if args.small else 4.0
    # a folder per length, apart from other lengths' files
    source, prepared = root / f"source_{seconds:g}s", root / f"prepared_{seconds:g}s"
    bench_decoding.write_youtube_like(source, files, seconds, *resolution,
                                      workers=max(1, args.workers))
    prepare.prepare(source, prepared, workers=max(1, args.workers))

    scale = SMALL if args.small else PAPER
    common = ["--data-root", str(prepared), "--workers", str(args.workers), *scale]
    per_epoch = files // (8 if args.small else 64)
    if steps + 5 > per_epoch:
        print(f"note: {steps} + 5 steps cross an epoch's start ({per_epoch} batches an epoch); "
              "its wait counts")
    print(f"\n== 2. the levers, {steps} steps each, xID")

    def bench(flags, mode="xid"):
        # the timed steps (and 5 untimed ones) inside one epoch: each starts with an empty queue
        batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else (8 if args.small else 64)
        within = max(1, min(steps, files // batch - 6))
        result = bench_step.main([*common, "--mode", mode, *flags, "--steps", str(within)])
        gc.collect()  # the run's model, optimiser and banks would count in the next one's memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    rows, kept = [("baseline", bench([]), True)], []
    for name, flags in LEVERS:
        if name == "torch.compile" and not args.compile:
            continue
        if args.small and name == "batch 128":
            flags = ["--batch-size", str(min(16, files))]
        result = bench([*kept, *flags])
        best = max(r["clips_per_s"] for _, r, keep in rows if keep)
        keep = result["clips_per_s"] >= 1.03 * best
        kept += flags if keep else []
        rows.append((name, result, keep))
    print(f"\n{'lever (on top of those kept above)':36s} {'clips/s':>8s} {'MFU':>6s} {'data wait':>9s} "
          f"{'memory GiB':>10s}  kept")
    for name, r, keep in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "n/a"
        print(f"{name:36s} {r['clips_per_s']:8.1f} {mfu:>6s} {r['data_wait_of_total']:9.1%} {mem:>10s}  "
              f"{'yes' if keep else 'no'}")
    print(f"kept: {' '.join(kept) or '(none)'}")

    print("\n== 3. xid and robust with the kept levers")
    times, wait, fastest = {}, {}, {}
    for mode, extra in {"xid": [], "robust": ["--strategy", "cycle"]}.items():
        result = bench([*kept, *extra], mode)
        times[mode], wait[mode] = result["median"], result["data_wait_of_total"]
        fastest[mode] = result["clips_per_s"]
    step = {m: sum(t.values()) for m, t in times.items()}
    print(f"\n{'mode':10s} {'step ms':>8s} {'x xid':>6s} {'data wait (of the total time)':>30s}")
    for m in times:
        print(f"{m:10s} {1e3 * step[m]:8.1f} {step[m] / step['xid']:6.2f} {wait[m]:30.1%}")

    print("\n== 4. two epochs, stopped after the first and resumed")
    out = root / "resume"
    if out.exists():  # a check from an earlier call
        shutil.rmtree(out)
    run_flags = [*common, "--out", str(out), "--no-eval", "--warmup-epochs", "1"]
    train.main([*run_flags, "--epochs", "1"])
    train.main([*run_flags, "--epochs", "2", "--resume"])
    epochs = [r["epoch"] for r in runs.epoch_records(out)]

    jobs = args.jobs or (2 if args.small else 6)
    print(f"\n== 5. the λ sweep's first {jobs} points at once, with the figures' recipe and evaluation")
    sweep_root = root / "sweep"
    if sweep_root.exists():
        shutil.rmtree(sweep_root)
    if args.small:  # a tiny world and one epoch: the machinery, not the time
        embedded = embedded_dataset.make(root / "embedded_small", log=lambda *a: None, seed=0, per_class=5,
                                         downstream_per_class=6, faulty_share=0.2, size=32, fps=8,
                                         seconds=2.0, rate=16000)
        grid = ["--epochs", "1", "--warmup-epochs", "1", "--eval-clips", "1", "--ft-repeats", "1"]
    else:
        embedded = root / "embedded"
        embedded_dataset.ensure(embedded)
        grid = []  # the figures' own: 24 epochs, 3 clips, 2 fine-tunings
    lams = ["0", "0.25", "0.5", "0.75", "1"][:jobs]
    seeds = ["0", "1"][:max(1, math.ceil(jobs / len(lams)))]
    points = len(lams) * len(seeds)
    t0 = time.perf_counter()
    plots.main(["lambda", "--seeds", *seeds, "--lams", *lams, "--no-oracle", *grid, "--jobs", str(jobs),
                "--workers", str(max(1, args.workers // jobs)), "--runs", str(sweep_root),
                "--embedded-root", str(embedded), "--out", str(root / "sweep_figure")])
    sweep_min = (time.perf_counter() - t0) / 60
    rounds = math.ceil(39 / jobs) + math.ceil(27 / jobs)  # the two sweeps run one after the other
    figures_min = sweep_min / math.ceil(points / jobs) * rounds
    print(f"{points} points in {sweep_min:.1f} min with {jobs} at once: Figures 1 and 2 (39 and 27 "
          f"points, {rounds} rounds of {jobs}) would take about {figures_min:.0f} min at this pace")

    worst = max(wait.values())
    checks = [(f"at least 1,000 clips/s at the paper's clip shape ({fastest['xid']:.0f} with the kept levers)",
               fastest["xid"] >= 1000),
              (f"data wait below 5% of the time (worst {worst:.1%})", worst < 0.05),
              (f"robust step <= 1.10x xid's ({step['robust'] / step['xid']:.2f}x)",
               step["robust"] <= 1.10 * step["xid"]),
              (f"the resumed run logged epochs {epochs}", epochs == [1, 2]),
              (f"Figures 1 and 2 within 15 min on this machine (about {figures_min:.0f} min)", figures_min <= 15)]
    print("\n== checks" + (" (small settings on this CPU: the timings say nothing of a GPU)"
                             if args.small else ""))
    for what, ok in checks:
        print(f"  {'ok    ' if ok else 'MISSED'}  {what}")
    return {"levers": rows, "kept": kept, "clips_per_s": fastest, "step": step, "times": times, "wait": wait, "epochs": epochs,
            "figures_min": figures_min, "checks": checks}


if __name__ == "__main__":
    main(sys.argv[1:])
