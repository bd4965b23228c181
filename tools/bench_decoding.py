"""What prepare buys: a YouTube-like download against its prepared copy, clips/s per core and
with the training loader's workers.

    python tools/bench_decoding.py                              # writes a YouTube-like source first
    python tools/bench_decoding.py /data/k400 --prepared /data/k400_128   # your own tree

The source is FFmpeg's moving test pattern with grain at 1280x720, 30 fps, a keyframe every 250
frames (x264's default interval) and AAC 44.1 kHz stereo: a YouTube download's structure, where a
clip decodes every frame since a keyframe up to seconds before it. The clip timed is the paper's
(8 frames at 16 fps cropped to 112, 2 s of audio at 24 kHz).
"""
import argparse
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from itertools import takewhile
from pathlib import Path

import av
import numpy as np
import torch
from av.video.frame import PictureType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
import listings  # noqa: E402
from data import AVClips, ClipSpec, collate_clips  # noqa: E402
from listings import kinetics_folder, scan  # noqa: E402
from prepare import prepare  # noqa: E402
from runs import progress  # noqa: E402

PAPER_CLIP = ClipSpec(frames=8, fps=16.0, size=112, audio_seconds=2.0, sample_rate=24000)


def _write_youtube_like_file(path, seconds, width, height, seed):
    """FFmpeg's moving test pattern with grain (so it does not compress to nothing) at 30 fps, x264
    with a keyframe every 250 frames (its default interval), AAC 44.1 kHz stereo: a YouTube
    download's structure (a clip decodes from a keyframe up to seconds before it)."""
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with av.open(f"testsrc2=s={width}x{height}:r=30:d={seconds},"
                 f"noise=alls=8:allf=t+u:all_seed={seed}",
                 format="lavfi") as src, av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        # a keyframe every 250 frames (x264's default interval), no extra ones at scene cuts
        vs.codec_context.options = {"preset": "veryfast", "crf": "23", "threads": "1",
                                    "sc_threshold": "0"}
        aus = out.add_stream("aac", rate=44100)
        aus.layout = "stereo"
        for frame in src.decode(video=0):
            frame.pict_type = PictureType.NONE  # lavfi marks each frame a keyframe; x264 would obey
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        t = np.arange(int(seconds * 44100)) / 44100
        wave = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)
                + 0.05 * rng.standard_normal(len(t)))
        for k in range(0, len(t), 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([wave[k:k + 1024]] * 2).astype(np.float32),
                                               format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, k
            out.mux(aus.encode(frame))
        out.mux(aus.encode(None))
    os.replace(tmp, path)
    return str(path)


def write_youtube_like(root, files=8, seconds=10.0, width=1280, height=720, workers=None):
    """A Kinetics-style tree root/train/<class>/<id>.mp4 of YouTube-like files (kept if there)."""
    paths = [Path(root) / "train" / f"class_{k % 2}" / f"yt{k:04d}_000000_{int(seconds):06d}.mp4"
             for k in range(files)]
    todo = [p for p in paths if not p.exists()]
    for p in todo:
        p.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or listings.available_cores()) as pool:
        jobs = [pool.submit(_write_youtube_like_file, p, seconds, width, height, k)
                for k, p in enumerate(todo)]
        for job in progress(as_completed(jobs), total=len(jobs),
                            desc="writing a YouTube-like source", unit="file"):
            job.result()
    return paths


def raw_decode(path, start, audio_start, spec):
    """The loader's floor: plain PyAV decoding of the same windows, no cropping or resampling."""
    with av.open(str(path)) as c:
        vs, aus = c.streams.video[0], c.streams.audio[0]
        c.seek(int(start / vs.time_base), stream=vs, backward=True)
        frames = [f.to_ndarray(format="rgb24") for f in takewhile(
            lambda f: f.time <= start + spec.video_seconds, c.decode(vs)) if f.time >= start]
        c.seek(int(audio_start / aus.time_base), stream=aus, backward=True)
        audio = [f.to_ndarray() for f in takewhile(
            lambda f: f.time <= audio_start + spec.audio_seconds, c.decode(aus))]
    return frames, audio


def ms_per_clip(fn, videos, clips, spec, seed=0):
    """Mean milliseconds of fn(video, start) over `clips` (video, start) draws made as the loader
    makes them (start uniform where a clip fits), on one core."""
    rng, total = random.Random(seed), 0.0
    for _ in range(clips):
        v = rng.choice(videos)
        start = rng.uniform(0, max(v.duration - spec.video_seconds, 0))
        t = time.perf_counter()
        fn(v, start)
        total += time.perf_counter() - t
    return 1e3 * total / clips


def loader_clips_per_s(videos, spec, workers, batch_size=32, batches=16):
    """Clips/s of the training loader (AVClips in `workers` processes), after its start-up."""
    ds = AVClips(videos * (1 + batch_size * (batches + 1) // len(videos)), spec, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_clips, shuffle=True)
    it = iter(loader)
    for _ in range(workers):  # each worker's first batch carries its start-up
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["index"])
    return n / (time.perf_counter() - t)


def bench_sample(source, files, seed=0):
    """A seeded sample of `files` videos of source/train (a bench reads a few clips: it need not
    scan, nor prepare, a whole download)."""
    videos, _ = kinetics_folder(source, "train", log=lambda *_: None)
    return sorted(random.Random(seed).sample(videos, min(files, len(videos))))


def compare(source, prepared, sample, spec=PAPER_CLIP, clips=20, workers=(1,), log=print):
    """The bench: the `sample` of a source tree against its prepared copy, per core and with the
    loader's workers."""
    torch.set_num_threads(1)
    quiet = lambda *_: None
    copies = [replace(v, path=str((Path(prepared) / Path(v.path).relative_to(source))
                                  .with_suffix(".mp4"))) for v in sample]
    src, _ = scan(sample, spec, log=quiet)
    dst, _ = scan(copies, spec, log=quiet)
    item = lambda ds: lambda v, start: ds._clip(v, v, start, np.random.default_rng(0))
    rows = {}
    for name, videos in (("source", src), ("prepared", dst)):
        ds = AVClips(videos, spec, train=True)
        rows[name] = {"item": ms_per_clip(item(ds), videos, clips, spec),
                      "raw": ms_per_clip(
                          lambda v, s: raw_decode(v.path, s, ds.audio_start(s, v.duration), spec),
                          videos, clips, spec)}
    with av.open(src[0].path) as c:
        s = c.streams.video[0]
        shape = f"{s.codec_context.width}x{s.codec_context.height}, {float(s.average_rate):.0f} fps"
    with av.open(dst[0].path) as c:
        s = c.streams.video[0]
        shape_p = (f"{s.codec_context.width}x{s.codec_context.height}, "
                   f"{float(s.average_rate):.0f} fps")
    log(f"clip: {spec.frames} frames at {spec.fps:g} fps cropped to {spec.size}, "
        f"{spec.audio_seconds:g} s of audio at {spec.sample_rate} Hz; "
        f"means over {clips} random clips, one core\n"
        f"{'':34s} {'ms/clip':>8s} {'clips/s':>8s}   raw PyAV decode of the window\n" +
        "".join(f"{f'{n} ({sh}, {len(v)} files)':34s} {r['item']:8.1f} {1e3 / r['item']:8.1f}"
                f"   {r['raw']:.1f} ms\n"
                for (n, r), sh, v in zip(rows.items(), (shape, shape_p), (src, dst))) +
        f"prepared / source, per core: "
        f"{rows['source']['item'] / rows['prepared']['item']:.1f}x faster")
    loader = {}
    for w in workers:
        loader[w] = loader_clips_per_s(dst, spec, w)
        log(f"loader on the prepared copy, {w} worker(s): {loader[w]:7.1f} clips/s = "
            f"{loader[w] / w / (1e3 / rows['prepared']['raw']):.2f} of raw decoding per core")
    return rows, loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=None,
                   help="a Kinetics-style tree (SRC/train/<class>/...); "
                        "default: write a YouTube-like one")
    p.add_argument("--prepared", default=None,
                   help="its prepared copy (default: the sample read is prepared now, "
                        "into SRC-bench-prepared beside it)")
    p.add_argument("--youtube-like", default="data/youtube_like",
                   help="where the YouTube-like source is written")
    p.add_argument("--files", type=int, default=8,
                   help="videos to read (and YouTube-like files to write)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each YouTube-like file")
    p.add_argument("--resolution", default="1280x720", help="WxH of the YouTube-like files")
    p.add_argument("--clips", type=int, default=20, help="random clips timed per tree")
    p.add_argument("--workers", type=int, nargs="+", default=[1, listings.available_cores()],
                   help="loader worker counts to time on the prepared copy")
    args = p.parse_args(argv)
    try:
        width, height = (int(x) for x in args.resolution.lower().split("x"))
    except ValueError:
        p.error(f"--resolution {args.resolution!r}: expected WxH, e.g. 1280x720")
    if min(args.workers) < 1 or args.files < 1 or args.clips < 1:
        p.error("--workers, --files and --clips must be >= 1")
    if args.source is None:
        args.source = Path(args.youtube_like) / "source"
        write_youtube_like(args.source, args.files, args.seconds, width, height)
    if not (Path(args.source) / "train").is_dir():
        p.error(f"{args.source} has no train/ folder (the bench reads SRC/train/<class>/<video>)")
    sample = bench_sample(args.source, args.files)
    if args.prepared is None:  # only the sample is prepared
        args.prepared = Path(f"{Path(args.source).resolve()}-bench-prepared")
        prepare(args.source, args.prepared, only={Path(v.path) for v in sample})
    compare(args.source, args.prepared, sample, clips=args.clips, workers=args.workers)


if __name__ == "__main__":
    main()
