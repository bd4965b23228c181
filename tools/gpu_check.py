"""The CUDA path at the paper's scale, checked in one go: run it whenever a GPU is at hand.

    python tools/gpu_check.py            # on a GPU machine with 16 cores
    python tools/gpu_check.py --small    # the same steps at small settings, on any CPU (tested)

1. writes a YouTube-like source (tools/bench_decoding.py's) and prepares it (tools/prepare.py);
2. tools/bench_step.py with R(2+1)D-18 + the AVID audio net at 8 x 112^2, batch 64, bf16, the
   machine's cores as loader workers: data-wait fraction, clips/s, the split of a step, peak
   memory, for xid, weighted, soft (cycle) and robust. The timed steps stay inside one epoch (2,048
   files are 32 batches): each epoch starts with the loader's queue empty, about one worker's batch
   of waiting, a large share of a 32-step epoch and a negligible one of a Kinetics epoch;
3. a 2-epoch run on the prepared files, stopped after its first epoch and resumed (--resume).
It ends with three checks, each marked ok or MISSED: data wait below 10%, robust's step at most
1.10x xid's, the resumed run's epochs 1 and 2 in its log.
"""
import argparse
import gc
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
import bench_decoding  # noqa: E402
import bench_step  # noqa: E402
import data  # noqa: E402
import prepare  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

PAPER = ["--video-arch", "r2plus1d_18", "--audio-arch", "avid", "--frames", "8", "--fps", "16",
         "--crop", "112", "--audio-seconds", "2", "--sample-rate", "24000", "--batch-size", "64",
         "--amp", "bf16", "--num-negatives", "1024"]
SMALL = ["--frames", "4", "--fps", "8", "--crop", "32", "--audio-seconds", "1",
         "--sample-rate", "16000", "--batch-size", "8", "--amp", "off", "--num-negatives", "4"]
MODES = {"xid": [], "weighted": [], "soft": ["--strategy", "cycle"],
         "robust": ["--strategy", "cycle"]}


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
    p.add_argument("--workers", type=int, default=data.available_cores(),
                   help="loader workers (default: all cores)")
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
    print(f"\n== 2. tools/bench_step.py, {steps} steps per mode")
    times, wait = {}, {}
    for mode, extra in MODES.items():
        bench = bench_step.main([*common, "--mode", mode, *extra, "--steps", str(steps)])
        times[mode], wait[mode] = bench["median"], bench["data_wait_of_total"]
        gc.collect()  # the mode's model, optimiser and banks would count in the next one's memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    step = {m: sum(t.values()) for m, t in times.items()}
    print(f"\n{'mode':10s} {'step ms':>8s} {'x xid':>6s} {'data wait (of the total time)':>30s}")
    for m in times:
        print(f"{m:10s} {1e3 * step[m]:8.1f} {step[m] / step['xid']:6.2f} {wait[m]:30.1%}")

    print("\n== 3. two epochs, stopped after the first and resumed")
    out = root / "resume"
    if out.exists():  # a check from an earlier call
        shutil.rmtree(out)
    run_flags = [*common, "--out", str(out), "--no-eval", "--warmup-epochs", "1"]
    train.main([*run_flags, "--epochs", "1"])
    train.main([*run_flags, "--epochs", "2", "--resume"])
    epochs = [r["epoch"] for r in runs.epoch_records(out)]

    worst = max(wait.values())
    checks = [(f"data wait below 10% of the time in every mode (worst {worst:.1%})", worst < 0.10),
              (f"robust step <= 1.10x xid's ({step['robust'] / step['xid']:.2f}x)",
               step["robust"] <= 1.10 * step["xid"]),
              (f"the resumed run logged epochs {epochs}", epochs == [1, 2])]
    print("\n== checks" + (" (small settings on this CPU: the timings say nothing of a GPU)"
                             if args.small else ""))
    for what, ok in checks:
        print(f"  {'ok    ' if ok else 'MISSED'}  {what}")
    return {"step": step, "times": times, "wait": wait, "epochs": epochs, "checks": checks}


if __name__ == "__main__":
    main(sys.argv[1:])
