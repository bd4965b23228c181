"""Real downloads at training scale: transcode once, then measure what it buys.

A Kinetics download is YouTube's encodes: mostly 720p (some 1080p), 25-30 fps, a keyframe every few
seconds. A training clip of 8 frames from such a file first decodes every frame since the last
keyframe at full resolution: a quarter of a second of one core per clip or more, where one GPU
trains on the order of a thousand clips a second. So every serious video codebase transcodes the
download once to the scale it trains at. `prepare` does that with PyAV (FFmpeg inside; nothing to
install):

    python tools/prepare.py SRC DST  # Kinetics tree / UCF101 / HMDB51 folder -> same layout in DST
    python tools/bench_decoding.py   # a YouTube-like source vs its prepared copy: clips/s per core

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
and every metadata file (split lists, CSVs) copied as is; the listings in listings.py find a prepared
`v_x.mp4` where a split file names `v_x.avi`.
"""
import argparse
import fcntl
import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.frame import PictureType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
import listings  # noqa: E402
from listings import METADATA_EXTENSIONS, VIDEO_EXTENSIONS, in_processes, probe  # noqa: E402
from runs import progress  # noqa: E402


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
    """(width, height): the short side at short_side (never enlarged), both even (H.264's 4:2:0)."""
    f = min(1.0, short_side / min(width, height))
    return max(2, round(width * f / 2) * 2), max(2, round(height * f / 2) * 2)


def _video_graph(stream, width, height, fps):
    """FFmpeg's own filters: fps (the frame shown at each 1/fps tick) -> scale (area) -> yuv420p."""
    graph = av.filter.Graph()
    graph.link_nodes(graph.add_buffer(template=stream), graph.add("fps", f"fps={fps}"),
                     graph.add("scale", f"w={width}:h={height}:flags=area"),
                     graph.add("format", "yuv420p"), graph.add("buffersink")).configure()
    return graph


class _Audio:
    """Decoded audio -> the prepared layout and rate, on the source's clock. A stream may change
    channels or rate mid-file (broadcast recordings do): a resampler is made for each run. A gap in
    the source's timestamps becomes silence, so that what follows stays where it was."""

    def __init__(self, out_stream, scale):
        self.out, self.scale = out_stream, scale
        self.kind = self.resampler = None
        self.next_pts = None   # the next output sample, at the output rate, on the source's clock
        self.source_end = None  # where the last input frame ended, in seconds

    def push(self, frame):
        kind = None if frame is None else (frame.format.name, frame.layout.name, frame.sample_rate)
        packets = []
        if self.resampler is not None and kind != self.kind:  # a new run, or the end: flush the old
            packets += self._encode(self.resampler.resample(None))
            self.resampler = None
        if frame is None:
            return packets + list(self.out.encode(None))
        if frame.time is not None:
            if self.next_pts is None:
                self.next_pts = round(frame.time * self.scale.sample_rate)
            elif self.source_end is not None and frame.time - self.source_end > 0.01:
                packets += self._encode([self._silence(frame.time - self.source_end)])
            self.source_end = frame.time + frame.samples / frame.sample_rate
        if self.resampler is None:
            self.kind = kind
            self.resampler = av.AudioResampler(format="fltp", layout=self._layout(),
                                               rate=self.scale.sample_rate)
        return packets + self._encode(self.resampler.resample(frame))

    def _layout(self):
        return "mono" if self.scale.channels == 1 else "stereo"

    def _silence(self, seconds):
        samples = np.zeros((self.scale.channels, round(seconds * self.scale.sample_rate)),
                           np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=self._layout())
        frame.sample_rate = self.scale.sample_rate
        return frame

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
    tmp = dst.with_name(f".{dst.name}{TMP_MARK}{os.getpid()}")  # hidden: never listed half done
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), "w", format="mp4") as out:
            v_in = inp.streams.video[0]
            a_in = inp.streams.audio[0] if inp.streams.audio else None
            width, height = scaled_size(v_in.codec_context.width, v_in.codec_context.height,
                                        scale.short_side)
            graph = _video_graph(v_in, width, height, scale.fps)
            v_out = out.add_stream("libx264", rate=Fraction(scale.fps).limit_denominator(1001))
            v_out.width, v_out.height, v_out.pix_fmt = width, height, "yuv420p"
            v_out.codec_context.gop_size = scale.keyframe_interval
            # one thread each: prepare runs one file per process, in parallel over the cores
            v_out.codec_context.options = {
                "crf": str(scale.crf), "preset": "veryfast", "threads": "1",
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

            last = 0.0  # where decoded streams end: a file cut off mid-data ends early, no error
            for packet in inp.demux(*[s for s in (v_in, a_in) if s is not None]):
                for frame in packet.decode():
                    last = max(last, frame.time or 0.0)
                    out.mux(video_packets(frame) if packet.stream is v_in else audio.push(frame))
            declared = (float(((v_in.start_time or 0) + v_in.duration) * v_in.time_base)
                        if v_in.duration  # Matroska declares only the file's duration
                        else (inp.duration or 0) / av.time_base)
            if declared and last < declared - 1.0:
                raise RuntimeError(f"truncated: its streams end at {last:.1f}s of the "
                                   f"{declared:.1f}s it declares")
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
TMP_MARK = ".prepare-tmp"  # in the names of the files prepare is writing (and only of those)
SETTINGS_FILE = "prepare.json"     # DST's record of the scale it was prepared at
FAILED_FILE = "prepare-failed.txt"  # the files prepare could not read, with the reason


def _walk(src):
    """Every non-hidden file under src, following symbolic links to folders (a download assembled
    from several disks often links class folders), each real folder once."""
    seen, files = set(), []
    for folder, dirs, names in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder) / n for n in names
                  if not n.startswith(".") and n not in (SETTINGS_FILE, FAILED_FILE)]
    return sorted(files)


def plan(src, dst, only=None):
    """Every file under src (or only those in `only`) -> (videos [(source, destination .mp4)],
    metadata [(source, destination)], clashes [(source, the source prepared in its place)]).
    Metadata is what has a metadata extension (.txt, .csv, .json, .md); every other file is tried as
    a video. Two videos of one name in different containers (a.mkv, a.webm) would both become a.mp4:
    the one listings.kinetics_csv would read wins (a known video extension, then the last name), so the
    source and its copy train on the same file; the other is named."""
    src, dst = Path(src), Path(dst)
    videos, metadata, by_out = [], [], {}
    for p in _walk(src):
        if only is not None and p not in only:
            continue
        rel = p.relative_to(src)
        if p.suffix.lower() in METADATA_EXTENSIONS:
            metadata.append((p, dst / rel))
        else:
            by_out.setdefault((dst / rel).with_suffix(".mp4"), []).append(p)
    clashes = []
    for out, sources in by_out.items():
        *others, chosen = sorted(sources,
                                 key=lambda f: (f.suffix.lower() in VIDEO_EXTENSIONS, f.name))
        videos.append((chosen, out))
        clashes += [(o, chosen) for o in others]
    return sorted(videos), metadata, clashes


def _prepare_one(job):
    """(source, destination, scale) -> (None or the reason it cannot be prepared, has audio);
    run in a worker process."""
    src, dst, scale = job
    _, reason = probe(src, need_audio=False)  # the scan's reasons: missing, zero bytes, corrupt...
    if reason:
        return reason, False
    try:
        return None, transcode(src, dst, scale)
    except Exception as e:  # noqa: BLE001 -- FFmpeg's error on this file is its reason
        return f"cannot transcode: {type(e).__name__}: {e}", False


def check_scale(scale):
    """A ValueError naming the setting the encoders refuse (AAC takes only some rates), found by
    encoding a frame of each in memory, before anything is written."""
    try:
        with av.open(io.BytesIO(), "w", format="mp4") as out:
            v = out.add_stream("libx264", rate=Fraction(scale.fps).limit_denominator(1001))
            v.width, v.height, v.pix_fmt = 2 * scale.short_side, scale.short_side, "yuv420p"
            v.codec_context.options = {"crf": str(scale.crf)}
            a = out.add_stream("aac", rate=scale.sample_rate)
            a.layout = "mono" if scale.channels == 1 else "stereo"
            out.mux(v.encode(av.VideoFrame.from_ndarray(
                np.zeros((scale.short_side, 2 * scale.short_side, 3), np.uint8), format="rgb24")))
            frame = av.AudioFrame.from_ndarray(np.zeros((scale.channels, 1024), np.float32),
                                               format="fltp", layout=a.layout.name)
            frame.sample_rate = scale.sample_rate
            out.mux(a.encode(frame))
    except (av.FFmpegError, ValueError) as e:
        raise ValueError(f"prepare: the encoders refuse {asdict(scale)}: {e} (AAC takes 8000, "
                         f"11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, ... Hz)") from e


def prepare(src, dst, scale=Scale(), workers=None, only=None, log=print):
    """Transcode every video under src (or only the files in `only`) to dst at `scale`, in parallel
    over processes; copy the metadata. A destination that exists and is newer than its source is
    done (files are written whole, then renamed), so a stopped prepare continues where it was.
    Returns {"prepared", "skipped", "failed": [(source, reason)], "no_audio", "seconds"}."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"prepare: SRC {src} is not a folder")
    if src.resolve() == dst.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"prepare: DST {dst} must be outside SRC {src}")
    check_scale(scale)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / ".prepare.lock", "w") as lock:  # closed on every way out, errors included
        try:  # two prepares into one DST would write the same files
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"prepare: another prepare is writing to {dst}") from None
        return _prepare_locked(src, dst, scale, workers, only, log)


def _prepare_locked(src, dst, scale, workers, only, log):
    settings = dst / SETTINGS_FILE
    if settings.exists() and json.loads(settings.read_text()) != asdict(scale):
        raise ValueError(f"prepare: {dst} was prepared at {json.loads(settings.read_text())}, not "
                         f"at {asdict(scale)}: give the same flags to continue it, or another DST")
    settings.write_text(json.dumps(asdict(scale)))
    for stale in dst.rglob(f".*{TMP_MARK}*"):  # left by a prepare that was killed outright
        stale.unlink()
    videos, metadata, clashes = plan(src, dst, only)
    for s, d in metadata:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    todo = [(s, d) for s, d in videos if not d.exists() or d.stat().st_mtime < s.stat().st_mtime]
    log(f"prepare {src} -> {dst}: {len(videos)} videos, {len(videos) - len(todo)} already done, "
        f"{len(metadata)} metadata files copied")
    failed = [(str(s), f"same name as {o.name}, which is prepared in its place (one .mp4 per name)")
              for s, o in clashes]
    prepared = no_audio = 0
    start, workers = time.perf_counter(), workers or listings.available_cores()
    jobs = [(s, d, scale) for s, d in todo]
    crashed = lambda job: ("cannot transcode: FFmpeg crashed on it "
                           "(the worker process died)", False)
    for (s, d, _), (reason, has_audio) in progress(
            in_processes(_prepare_one, jobs, workers, crashed),
            total=len(jobs), desc="prepare", unit="file"):
        if reason is None:
            prepared += 1
            no_audio += not has_audio
        elif s.suffix.lower() not in VIDEO_EXTENSIONS:  # not a video after all: copied as is,
            d = dst / s.relative_to(src)                 # so the scan of DST names it as SRC's did
            d.parent.mkdir(parents=True, exist_ok=True)  # maybe before any video of the folder
            shutil.copy2(s, d)
            failed.append((str(s), f"{reason} (copied as it is)"))
        else:
            failed.append((str(s), reason))
    seconds = time.perf_counter() - start
    (dst / FAILED_FILE).write_text("".join(f"{p}\t{r}\n" for p, r in sorted(failed)))
    log(f"prepare: {prepared} transcoded in {seconds:.0f} s ({workers} processes), {no_audio} of "
        f"them without audio (kept: UCF101 and HMDB51 need none), {len(failed)} not prepared" +
        (f", listed in {dst / FAILED_FILE}:" if failed else "") +
        "".join(f"\n  {p}: {r}" for p, r in sorted(failed)[:10]) +
        ("\n  ..." if len(failed) > 10 else ""))
    return {"prepared": prepared, "skipped": len(videos) - len(todo), "failed": sorted(failed),
            "no_audio": no_audio, "seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src",
                   help="a Kinetics tree (SRC/<split>/<class>/...), or a UCF101 / HMDB51 folder")
    p.add_argument("dst",
                   help="where the prepared copy goes (same layout); a stopped prepare continues")
    d = Scale()
    p.add_argument("--short-side", type=int, default=d.short_side,
                   help="pixels of the short side (not enlarged)")
    p.add_argument("--fps", type=float, default=d.fps, help="frame rate (the paper's clips: 16)")
    p.add_argument("--keyframe-interval", type=int, default=d.keyframe_interval,
                   help="frames between keyframes")
    p.add_argument("--sample-rate", type=int, default=d.sample_rate,
                   help="audio rate in Hz (the paper's: 24000)")
    p.add_argument("--channels", type=int, choices=[1, 2], default=d.channels,
                   help="audio channels")
    p.add_argument("--crf", type=int, default=d.crf,
                   help="x264 quality, 0-51: lower is better and bigger")
    p.add_argument("--workers", type=int, default=None,
                   help="files transcoded at once (default: this process's cores)")
    args = p.parse_args(argv)
    scale = Scale(args.short_side, args.fps, args.keyframe_interval, args.sample_rate,
                  args.channels, args.crf)
    for flag, ok in (("--short-side", args.short_side >= 2), ("--fps", args.fps > 0),
                     ("--keyframe-interval", args.keyframe_interval >= 1),
                     ("--sample-rate", args.sample_rate >= 8000), ("--crf", 0 <= args.crf <= 51),
                     ("--workers", args.workers is None or args.workers >= 1)):
        if not ok:
            p.error(f"{flag} is out of range")
    try:
        return prepare(args.src, args.dst, scale, args.workers)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
