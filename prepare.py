"""Real downloads at training scale: transcode once, then measure what it buys.

A Kinetics download is YouTube's encodes: mostly 720p (some 1080p), 25-30 fps, a keyframe every few
seconds. A training clip of 8 frames from such a file first decodes every frame since the last
keyframe at full resolution: about half a second of one core per clip, where one GPU trains on
the order of a thousand clips a second. So every serious video codebase transcodes the download
once to the scale it trains at. `prepare` does that with PyAV (FFmpeg inside; nothing to install):

    python data.py prepare SRC DST      # Kinetics tree / UCF101 / HMDB51 folder -> the same layout in DST
    python data.py bench --youtube-like # source vs prepared copy: clips/s per core, and the loader

What changes in a prepared file, and why the method does not notice:
- the short side becomes 128 px (the aspect is kept; a smaller picture is not enlarged). Training
  crops 112 px boxes of 40-100% of the frame's area and resizes them to 112 anyway, as R(2+1)D was
  trained on Kinetics (Tran et al., CVPR 2018: frames resized to 128 x 171, 112 x 112 crops).
- the frame rate becomes 16 fps, the rate the paper's clips are read at (8 frames at 16 fps); the
  loader picks, for each clip time, the frame shown then, so it would drop the others anyway.
- a keyframe every 16 frames (1 s): a clip starts at most 15 frames after one, instead of up to 250.
- audio becomes mono AAC at 24 kHz, the paper's rate; the loader mixes to mono and resamples anyway.
- quality: H.264 at CRF 23 (x264's default; a second encode of an encode: fine detail softens, but
  the picture at 112 px keeps what the clip shows) and AAC at 96 kbit/s, plenty for 12 kHz of band.
Timestamps are kept, so sound and picture stay aligned as in the source.
The layout is kept: DST/<split>/<class>/<name>.mp4 for every SRC/<split>/<class>/<name>.<any ext>,
and every metadata file (split lists, CSVs) copied as is; the listings in data.py find a prepared
`v_x.mp4` where a split file names `v_x.avi`.
"""
import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from itertools import takewhile
from pathlib import Path

import av
import numpy as np
from av.video.frame import PictureType

import torch

from data import (VIDEO_EXTENSIONS, AVClips, ClipSpec, collate_clips, kinetics_folder, probe, scan,
                  video_files)
from progress import progress


@dataclass(frozen=True)
class Scale:
    """What a prepared file is (prepare's flags)."""
    short_side: int = 128
    fps: float = 16.0
    keyframe_interval: int = 16   # frames
    sample_rate: int = 24000
    channels: int = 1
    crf: int = 23


# ----------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------
def scaled_size(width, height, short_side):
    """(width, height) with the short side at short_side (never enlarged), both even (H.264's 4:2:0)."""
    f = min(1.0, short_side / min(width, height))
    return max(2, round(width * f / 2) * 2), max(2, round(height * f / 2) * 2)


def _video_graph(stream, width, height, fps):
    """FFmpeg's own filters: fps (the frame shown at each 1/fps tick) -> scale (area) -> yuv420p."""
    graph = av.filter.Graph()
    graph.link_nodes(graph.add_buffer(template=stream), graph.add("fps", f"fps={fps}"),
                     graph.add("scale", f"w={width}:h={height}:flags=area"), graph.add("format", "yuv420p"),
                     graph.add("buffersink")).configure()
    return graph


class _Audio:
    """Decoded audio -> the prepared layout and rate, keeping the source's timestamps. A stream may
    change channels or rate mid-file (broadcast recordings do): a resampler is made for each run."""

    def __init__(self, out_stream, scale):
        self.out, self.scale = out_stream, scale
        self.kind = self.resampler = self.next_pts = None

    def push(self, frame):
        kind = None if frame is None else (frame.format.name, frame.layout.name, frame.sample_rate)
        packets = []
        if self.resampler is not None and kind != self.kind:  # a new run (or the end): flush the old one
            packets += self._encode(self.resampler.resample(None))
            self.resampler = None
        if frame is None:
            return packets + list(self.out.encode(None))
        if self.resampler is None:
            self.kind = kind
            self.resampler = av.AudioResampler(format="fltp", layout="mono" if self.scale.channels == 1 else "stereo",
                                               rate=self.scale.sample_rate)
        if self.next_pts is None and frame.time is not None:
            self.next_pts = round(frame.time * self.scale.sample_rate)
        return packets + self._encode(self.resampler.resample(frame))

    def _encode(self, frames):
        packets = []
        for f in frames:
            f.pts, f.time_base = self.next_pts or 0, Fraction(1, self.scale.sample_rate)
            self.next_pts = (self.next_pts or 0) + f.samples
            packets += self.out.encode(f)
        return packets


def transcode(src, dst, scale=Scale()):
    """src (any container FFmpeg reads) -> dst .mp4 at `scale`, written whole or not at all.
    Returns whether it has audio. Raises on a file FFmpeg cannot read to the end."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")  # hidden: listings never see a half file
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), "w", format="mp4") as out:
            v_in = inp.streams.video[0]
            a_in = inp.streams.audio[0] if inp.streams.audio else None
            width, height = scaled_size(v_in.codec_context.width, v_in.codec_context.height, scale.short_side)
            graph = _video_graph(v_in, width, height, scale.fps)
            v_out = out.add_stream("libx264", rate=Fraction(scale.fps).limit_denominator(1001))
            v_out.width, v_out.height, v_out.pix_fmt = width, height, "yuv420p"
            v_out.codec_context.gop_size = scale.keyframe_interval
            # one thread each: prepare runs one file per process, in parallel over the cores
            v_out.codec_context.options = {"crf": str(scale.crf), "preset": "veryfast", "threads": "1",
                                           "keyint_min": str(scale.keyframe_interval), "sc_threshold": "0"}
            audio = None
            if a_in is not None:
                a_out = out.add_stream("aac", rate=scale.sample_rate)
                a_out.layout = "mono" if scale.channels == 1 else "stereo"
                a_out.bit_rate = 96000
                audio = _Audio(a_out, scale)

            def video_packets(frame):
                graph.push(frame)
                packets = []
                while True:
                    try:
                        f = graph.pull()
                    except (av.BlockingIOError, av.EOFError):
                        return packets
                    f.pict_type = PictureType.NONE  # the source's keyframes do not force ours
                    packets += v_out.encode(f)

            for packet in inp.demux(*[s for s in (v_in, a_in) if s is not None]):
                for frame in packet.decode():
                    out.mux(video_packets(frame) if packet.stream is v_in else audio.push(frame))
            out.mux(video_packets(None) + list(v_out.encode(None)))
            if audio is not None:
                out.mux(audio.push(None))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return a_in is not None


# ----------------------------------------------------------------------------------------------
# A tree of files, in parallel, resumable
# ----------------------------------------------------------------------------------------------
SETTINGS_FILE = "prepare.json"     # DST's record of the scale it was prepared at
FAILED_FILE = "prepare-failed.txt"  # the files prepare could not read, with the reason


def plan(src, dst):
    """Every file under src -> (videos [(source, destination .mp4)], metadata [(source, destination)],
    clashes [(source, the source it clashes with)]). Two sources with one name but different
    containers (a.mkv, a.webm) would both become a.mp4: a video extension wins, the other is named."""
    src, dst = Path(src), Path(dst)
    videos, metadata, taken = [], [], {}
    everything = sorted(p for p in src.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                           for part in p.relative_to(src).parts))
    wanted = set(video_files(src, recursive=True))
    clashes = []
    for p in sorted(everything, key=lambda p: (p.suffix.lower() not in VIDEO_EXTENSIONS, str(p))):
        rel = p.relative_to(src)
        if p not in wanted:  # split lists, CSVs, annotations: copied as they are
            metadata.append((p, dst / rel))
            continue
        out = (dst / rel).with_suffix(".mp4")
        if out in taken:
            clashes.append((p, taken[out]))
            continue
        taken[out] = p
        videos.append((p, out))
    return sorted(videos), metadata, clashes


def _prepare_one(src, dst, scale):
    """(source, None or the reason it cannot be prepared, has audio) -- run in a worker process."""
    _, reason = probe(src, need_audio=False)  # the scan's reasons: missing, zero bytes, corrupt, ...
    if reason:
        return str(src), reason, False
    try:
        return str(src), None, transcode(src, dst, scale)
    except Exception as e:  # noqa: BLE001 -- FFmpeg's error on this file is its reason
        return str(src), f"cannot transcode: {type(e).__name__}: {e}", False


def prepare(src, dst, scale=Scale(), workers=None, log=print):
    """Transcode every video under src to dst at `scale`, in parallel over processes; copy metadata.
    A destination that exists is done (written atomically), so a stopped prepare continues where it
    was. Returns {"prepared", "skipped", "failed": [(source, reason)], "no_audio", "seconds"}."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"prepare: SRC {src} is not a folder")
    if src.resolve() == dst.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"prepare: DST {dst} must be outside SRC {src}")
    dst.mkdir(parents=True, exist_ok=True)
    settings = dst / SETTINGS_FILE
    if settings.exists() and json.loads(settings.read_text()) != asdict(scale):
        raise ValueError(f"prepare: {dst} was prepared at {json.loads(settings.read_text())}, not at "
                         f"{asdict(scale)}: give the same flags to continue it, or another DST")
    settings.write_text(json.dumps(asdict(scale)))
    videos, metadata, clashes = plan(src, dst)
    for s, d in metadata:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    todo = [(s, d) for s, d in videos if not d.exists()]
    log(f"prepare {src} -> {dst}: {len(videos)} videos, {len(videos) - len(todo)} already done, "
        f"{len(metadata)} metadata files copied")
    failed = [(str(s), f"same name as {o.name} (one .mp4 per name; {o.name} was prepared)") for s, o in clashes]
    no_audio, start = 0, time.perf_counter()
    workers = workers or os.cpu_count()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(_prepare_one, s, d, scale) for s, d in todo]
        for job in progress(as_completed(jobs), total=len(jobs), desc="prepare", unit="file"):
            path, reason, has_audio = job.result()
            if reason:
                failed.append((path, reason))
            no_audio += reason is None and not has_audio
    seconds = time.perf_counter() - start
    (dst / FAILED_FILE).write_text("".join(f"{p}\t{r}\n" for p, r in sorted(failed)))
    log(f"prepare: {len(todo) - len(failed) + len(clashes)} transcoded in {seconds:.0f} s "
        f"({workers} processes), {no_audio} of them without audio (kept: UCF101 and HMDB51 need none), "
        f"{len(failed)} not prepared" + (f", listed in {dst / FAILED_FILE}:" if failed else "") +
        "".join(f"\n  {p}: {r}" for p, r in sorted(failed)[:10]) + ("\n  ..." if len(failed) > 10 else ""))
    return {"prepared": len(todo) - len(failed) + len(clashes), "skipped": len(videos) - len(todo),
            "failed": sorted(failed), "no_audio": no_audio, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# What it buys: a YouTube-like source, and clips/s per core before and after
# ----------------------------------------------------------------------------------------------
PAPER_CLIP = ClipSpec(frames=8, fps=16.0, size=112, audio_seconds=2.0, sample_rate=24000)


def _write_youtube_like_file(path, seconds, width, height, seed):
    """FFmpeg's moving test pattern with grain (so it does not compress to nothing) at 30 fps, x264 with
    a keyframe every 250 frames (its default interval), AAC 44.1 kHz stereo: a YouTube download's
    structure (a clip decodes from a keyframe up to seconds before it)."""
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with av.open(f"testsrc2=s={width}x{height}:r=30:d={seconds},noise=alls=8:allf=t+u:all_seed={seed}",
                 format="lavfi") as src, av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        # a keyframe every 250 frames (x264's default interval), no extra ones at scene cuts
        vs.codec_context.options = {"preset": "veryfast", "crf": "23", "threads": "1", "sc_threshold": "0"}
        aus = out.add_stream("aac", rate=44100)
        aus.layout = "stereo"
        for frame in src.decode(video=0):
            frame.pict_type = PictureType.NONE  # lavfi marks every frame a keyframe; x264 would obey
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        t = np.arange(int(seconds * 44100)) / 44100
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.05 * rng.standard_normal(len(t))
        for k in range(0, len(t), 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([wave[k:k + 1024]] * 2).astype(np.float32), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts = 44100, k
            out.mux(aus.encode(frame))
        out.mux(aus.encode(None))
    os.replace(tmp, path)
    return str(path)


def write_youtube_like(root, files=8, seconds=10.0, width=1280, height=720, workers=None):
    """A Kinetics-style tree root/train/<class>/<id>.mp4 of YouTube-like files (kept if already there)."""
    paths = [Path(root) / "train" / f"class_{k % 2}" / f"yt{k:04d}_000000_{int(seconds):06d}.mp4" for k in range(files)]
    todo = [p for p in paths if not p.exists()]
    for p in todo:
        p.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        jobs = [pool.submit(_write_youtube_like_file, p, seconds, width, height, k) for k, p in enumerate(todo)]
        for job in progress(as_completed(jobs), total=len(jobs), desc="writing a YouTube-like source", unit="file"):
            job.result()
    return paths


def raw_decode(path, start, spec):
    """The floor for the loader: plain PyAV decoding of the same window, no resampling or transforms."""
    with av.open(str(path)) as c:
        vs, aus = c.streams.video[0], c.streams.audio[0]
        c.seek(int(start / vs.time_base), stream=vs, backward=True)
        frames = [f.to_ndarray(format="rgb24") for f in takewhile(lambda f: f.time <= start + spec.video_seconds,
                                                                   c.decode(vs)) if f.time >= start]
        c.seek(int(start / aus.time_base), stream=aus, backward=True)
        audio = [f.to_ndarray() for f in takewhile(lambda f: f.time <= start + spec.audio_seconds, c.decode(aus))]
    return frames, audio


def ms_per_clip(fn, videos, clips, seed=0):
    """Median milliseconds of fn(video, start) over `clips` random (video, start) draws, on one core."""
    rng, times = random.Random(seed), []
    for _ in range(clips):
        v = rng.choice(videos)
        start = rng.uniform(0, max(v.duration - PAPER_CLIP.shortest_file_seconds, 0))
        t = time.perf_counter()
        fn(v, start)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def loader_clips_per_s(videos, spec, workers, batch_size=32, batches=16):
    """Clips/s of the training loader (AVClips in `workers` processes), after its start-up."""
    ds = AVClips(videos * (1 + batch_size * (batches + 1) // len(videos)), spec, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips,
                                         shuffle=True)
    it = iter(loader)
    for _ in range(workers):  # each worker's first batch carries its start-up
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["index"])
    return n / (time.perf_counter() - t)


def compare(source, prepared, spec=PAPER_CLIP, clips=20, workers=(1,), log=print):
    """The bench: a source tree against its prepared copy, per core and with the loader's workers."""
    torch.set_num_threads(1)
    quiet = lambda *_: None
    src, _ = kinetics_folder(source, "train", log=quiet)
    src, _ = scan(src, spec, log=quiet)
    dst, _ = kinetics_folder(prepared, "train", log=quiet)
    dst, _ = scan(dst, spec, log=quiet)
    item = lambda ds: lambda v, start: ds._clip(v, v, start)
    rows = {}
    for name, videos in (("source", src), ("prepared", dst)):
        ds = AVClips(videos, spec, train=True)
        rows[name] = {"item": ms_per_clip(item(ds), videos, clips),
                      "raw": ms_per_clip(lambda v, s: raw_decode(v.path, s, spec), videos, clips)}
    with av.open(src[0].path) as c:
        s = c.streams.video[0]
        shape = f"{s.codec_context.width}x{s.codec_context.height}, {float(s.average_rate):.0f} fps"
    with av.open(dst[0].path) as c:
        s = c.streams.video[0]
        shape_p = f"{s.codec_context.width}x{s.codec_context.height}, {float(s.average_rate):.0f} fps"
    log(f"clip: {spec.frames} frames at {spec.fps:g} fps cropped to {spec.size}, {spec.audio_seconds:g} s of audio at "
        f"{spec.sample_rate} Hz; medians of {clips} random clips, one core\n"
        f"{'':34s} {'ms/clip':>8s} {'clips/s':>8s}   raw PyAV decode of the window\n" +
        "".join(f"{f'{n} ({sh}, {len(v)} files)':34s} {r['item']:8.1f} {1e3 / r['item']:8.1f}   {r['raw']:.1f} ms\n"
                for (n, r), sh, v in zip(rows.items(), (shape, shape_p), (src, dst))) +
        f"prepared / source, per core: {rows['source']['item'] / rows['prepared']['item']:.1f}x faster (target: >= 25x)")
    loader = {}
    for w in workers:
        loader[w] = loader_clips_per_s(dst, spec, w)
        log(f"loader on the prepared copy, {w} worker(s): {loader[w]:7.1f} clips/s = "
            f"{loader[w] / w / (1e3 / rows['prepared']['raw']):.2f} of raw decoding per core (target: >= 0.8)")
    return rows, loader
