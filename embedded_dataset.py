"""The embedded dataset: a small synthetic audio-visual world written to disk as plain video files.

It stands in for Kinetics, UCF101 and HMDB51 on a machine that has none of them, so that
`python train.py` runs the whole method, through the same loading code (`listings.py`, `data.py`)
that reads the real datasets. A shape bounces between the walls of a dark frame; every time it hits
a wall the audio has a click and a decaying tone:
- the class is in both streams: shape and direction of motion in the picture, pitch and timbre in
  the sound (10 pre-training classes); the colour is drawn per clip, a nuisance as in real video;
- the instance is in both streams too: the moments of the wall hits (cross-modal instance detail);
- with --hum > 0 (off by default) so is the recording, which says nothing of the class: a room's
  brightness behind the shape and the mains hum of its sound (60-240 Hz) come together, as a
  room's look and its acoustics, or a camera's noise and its hum, do in real video. Instance
  discrimination can then tell clips of one class apart by it, and pushes them apart: the faulty
  negatives Soft-xID is for;
- about 10% of the clips are natural faulty positives: background music or a voice-over-like babble
  unrelated to the picture, marked in kinetics/annotations.csv;
- two downstream sets, ucf/ (shape x direction, 18 classes, UCF101's split files) and hmdb/
  (shape x speed, 12 classes, HMDB51's split files), with any colour and any pitch.

    python embedded_dataset.py       # write it all to data/embedded; on first use train.py
                                     # writes the pre-training set, evaluate.py the stand-ins

Nothing in data.py or listings.py depends on this file; this file uses listings.py, as any dataset
would.
"""
import argparse
import csv
import fcntl
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

from listings import hmdb51, kinetics_folder, ucf101
from runs import atomic_write, progress

# ----------------------------------------------------------------------------------------------
# The world: bouncing shapes that click when they hit a wall
# ----------------------------------------------------------------------------------------------
PALETTE = {"red": (225, 50, 45), "green": (50, 200, 70), "blue": (60, 100, 235),
           "yellow": (235, 215, 50), "magenta": (215, 60, 205), "cyan": (50, 205, 215),
           "white": (235, 235, 235)}
# Pre-training classes: picture (shape, direction of motion) and sound (pitch, timbre) together.
# The colour is drawn per clip, a nuisance as in real video, so matching sound to picture needs the
# shape and the motion (and, for the instance, the timing of the wall hits).
KINETICS_CLASSES = [("circle", "horizontal", 262, "sine"), ("square", "vertical", 330, "square"),
                    ("triangle", "diagonal", 392, "saw"), ("diamond", "horizontal", 440, "square"),
                    ("cross", "vertical", 523, "sine"), ("ring", "diagonal", 587, "saw"),
                    ("circle", "vertical", 659, "saw"), ("square", "diagonal", 698, "sine"),
                    ("triangle", "vertical", 784, "square"), ("ring", "horizontal", 880, "sine")]
# Downstream classes need what pre-training should teach (shape, motion, its timing) with colour and
# sound made irrelevant: every shape x direction (UCF, 18 classes) and shape x speed (HMDB, 12), any
# colour, any pitch. Many classes and few labelled videos per class, as in UCF101 and HMDB51, so
# that neither retrieval (R@5) nor fine-tuning from scratch is easy without pre-training.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
UCF_CLASSES = [(s, m) for s in SHAPES for m in ("horizontal", "vertical", "diagonal")]
HMDB_CLASSES = [(s, sp) for s in SHAPES for sp in ("slow", "fast")]
VERSION = 5  # bump when the generator changes: existing copies are then regenerated
HUM = 0.0  # the recording's hum (amplitude), off by default; a new default needs a new VERSION
LOCK = ".writing.lock"  # held while a part is written, so that two first uses do not both write
SPEEDS = {"normal": (35.0, 80.0), "slow": (20.0, 35.0), "fast": (80.0, 120.0)}  # pixels/s at 64 px


def _shape_mask(shape, dx, dy, r):
    d = np.hypot(dx, dy)
    return {"circle": d <= r, "ring": (d <= r) & (d >= 0.55 * r),
            "square": np.maximum(abs(dx), abs(dy)) <= 0.85 * r,
            "diamond": abs(dx) + abs(dy) <= 1.15 * r,
            "triangle": (abs(dy) <= 0.8 * r) & (abs(dx) <= 0.6 * (dy + 0.8 * r)),
            "cross": ((abs(dx) <= r / 3) & (abs(dy) <= r))
                     | ((abs(dy) <= r / 3) & (abs(dx) <= r))}[shape]


def _bounce(u0, speed, length, t):
    """Reflecting motion on [0, length]: positions at times t and the times of wall hits."""
    u = u0 + speed * t
    pos = np.abs((u + length) % (2 * length) - length)
    k = np.arange(1, int((u0 + speed * t[-1]) // length) + 1)
    hits = (k * length - u0) / speed
    return pos, hits[hits > 0]


def _tone(pitch, timbre, t):
    phase = 2 * np.pi * pitch * t
    if timbre == "sine":
        return np.sin(phase)
    harmonics = range(1, 8, 2) if timbre == "square" else range(1, 6)
    return sum(np.sin(h * phase) / h for h in harmonics) * 0.7


def _render_clip(rng, shape, colour, motion, speed_range, pitch, timbre, audio_kind, size, fps,
                 seconds, rate, hum=0.0):
    """Frames (T, H, W, 3) and waveform of one instance, and its event times (the wall hits)."""
    t_video = np.arange(int(seconds * fps)) / fps
    r = 0.22 * size
    speed = rng.uniform(*speed_range) * size / 64
    length = size - 2 * r - 2
    axes = {"horizontal": (1, 0), "vertical": (0, 1), "diagonal": (1, 1)}[motion]
    pos, events = [], []
    for moving in axes:
        if moving:
            p, e = _bounce(rng.uniform(0, 2 * length), speed * rng.uniform(0.8, 1.2), length,
                           t_video)
            pos.append(r + 1 + p)
            events.append(e)
        else:
            pos.append(np.full_like(t_video, rng.uniform(r + 1, size - r - 1)))
    events = np.sort(np.concatenate(events))
    events = events[events < seconds]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # the recording: with hum > 0 a room's brightness comes with the mains hum of its sound
    room = rng.uniform()
    background = 20 + 70 * room + rng.uniform(-15, 15) * (xx / size)
    frames = np.empty((len(t_video), size, size, 3), np.uint8)
    for k in range(len(t_video)):
        img = np.repeat(background[..., None], 3, axis=2)
        img[_shape_mask(shape, xx - pos[0][k], yy - pos[1][k], r)] = PALETTE[colour]
        frames[k] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.01 * rng.standard_normal(len(t))
    if hum > 0:  # dubbed audio (music, voice-over) was recorded elsewhere: another room's hum
        heard = room if audio_kind == "events" else rng.uniform()
        wave += hum * np.sin(2 * np.pi * (60 + 180 * heard) * t + rng.uniform(0, 2 * np.pi))
    if audio_kind == "events":            # a click and a decaying tone at every wall hit
        for e in events:
            after = t >= e
            dt = t[after] - e
            wave[after] += 0.5 * np.exp(-dt / 0.05) * _tone(pitch, timbre, dt)
            wave[after] += 0.4 * (dt < 0.003) * rng.standard_normal(after.sum())
    elif audio_kind == "music":           # natural faulty positive: unrelated background music
        for start in np.arange(0, seconds, 0.25):
            on = (t >= start) & (t < start + 0.25)
            wave[on] += 0.25 * _tone(rng.choice([196, 247, 294, 349, 415, 494]), "sine", t[on])
    else:                                  # natural faulty positive: a voice-over-like babble
        babble = np.convolve(rng.standard_normal(len(t)), np.ones(8) / 8, mode="same")
        wave += 0.4 * babble * (0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)))
    return frames, wave.astype(np.float32), events


def write_av_file(path, frames, wave, fps, rate):
    """H.264 video + AAC mono audio in an .mp4, with PyAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=int(fps))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # constant quantiser, one thread: x264's CRF rate control can give different bytes for the
        # same frames from run to run, and the seed must fix what is decoded
        vs.codec_context.options = {"preset": "veryfast", "qp": "20", "threads": "1"}
        vs.codec_context.thread_count = 1
        aus = out.add_stream("aac", rate=rate)
        aus.layout = "mono"
        for f in frames:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(vs.encode())
        af = av.AudioFrame.from_ndarray(np.clip(wave, -1, 1)[None], format="fltp", layout="mono")
        af.sample_rate, af.pts = rate, 0
        out.mux(aus.encode(af))
        out.mux(aus.encode())


def make(root="data/embedded", seed=0, per_class=60, downstream_per_class=30, faulty_share=0.1,
         size=64, fps=16, seconds=3.0, rate=16000, hum=HUM, downstream=True, log=print):
    """Write the embedded dataset under root: kinetics/{train,val}/<class>/<id>.mp4 (+ the
    official-style CSV and annotations.csv marking natural faulty positives), ucf/ and hmdb/ with
    split files. Every clip is drawn from one generator seeded with `seed`, in a fixed order: same
    seed, same data. downstream=False writes the pre-training set alone, which is all train.py
    reads; write_downstream adds the stand-ins later from the generator's state saved in
    embedded.json, to the same files as one call would have written."""
    root = Path(root)
    marker = root / "embedded.json"
    if root.is_dir() and any(f.name != LOCK for f in root.iterdir()) and not marker.exists():
        raise ValueError(f"embedded_dataset.py: {root} is not empty and holds no embedded.json "
                         f"(not an embedded dataset); give an empty or new --embedded-root")
    # what another VERSION wrote goes first (its classes may have other names); the marker says
    # which parts are complete, so an interrupted part is made again
    for generated in ("kinetics", "ucf", "hmdb"):
        shutil.rmtree(root / generated, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    params = dict(version=VERSION, seed=seed, per_class=per_class,
                  downstream_per_class=downstream_per_class, faulty_share=faulty_share, size=size,
                  fps=fps, seconds=seconds, rate=rate, hum=hum)
    atomic_write(marker, json.dumps({**params, "parts": [], "complete": False}))
    rng = np.random.default_rng(seed)
    events = _write_part(root, "kinetics", rng, params, log)
    atomic_write(root / "events.json", json.dumps(events))
    state = rng.bit_generator.state  # where the stand-ins' draws start (write_downstream)
    atomic_write(marker, json.dumps({**params, "parts": ["kinetics"], "complete": False,
                                     "generator_after_kinetics": state}, indent=1))
    return write_downstream(root, log) if downstream else root


def write_downstream(root, log=print):
    """The UCF and HMDB stand-ins of a dataset whose pre-training set make() wrote, drawn on from
    where the pre-training set left the generator."""
    root, marker = Path(root), Path(root) / "embedded.json"
    made = json.loads(marker.read_text())
    rng = np.random.default_rng()
    rng.bit_generator.state = made.pop("generator_after_kinetics")
    for generated in ("ucf", "hmdb"):
        shutil.rmtree(root / generated, ignore_errors=True)
    events = _write_part(root, "downstream", rng, made, log)
    events = {**json.loads((root / "events.json").read_text()), **events}
    atomic_write(root / "events.json", json.dumps(events))
    made.update(parts=["kinetics", "downstream"], complete=True)
    atomic_write(marker, json.dumps(made, indent=1))  # written last: marks a complete set
    return root


def _write_part(root, part, rng, params, log):
    """Draw the clips of one part ("kinetics", or "downstream": ucf/ and hmdb/) one after the other
    from rng (so the seed fixes the data) and encode them in processes, half of the work
    (deterministic: constant quantiser). Returns each clip's wall-hit times."""
    t0, events_of, pending = time.time(), {}, []
    p = params
    total = (len(KINETICS_CLASSES) * p["per_class"] if part == "kinetics" else
             (len(UCF_CLASSES) + len(HMDB_CLASSES)) * p["downstream_per_class"])
    what = "pre-training set" if part == "kinetics" else "downstream stand-ins"
    workers = max(1, len(os.sched_getaffinity(0)))
    with ProcessPoolExecutor(workers) as pool, progress(
            total=total, desc=f"writing the embedded {what}", unit="clip") as bar:
        def clip(rel, shape, colour, motion, speed, pitch, timbre, audio_kind="events"):
            frames, wave, events = _render_clip(rng, shape, colour, motion, SPEEDS[speed], pitch,
                                                timbre, audio_kind, p["size"], p["fps"],
                                                p["seconds"], p["rate"], p["hum"])
            pending.append(pool.submit(write_av_file, root / rel, frames, wave, p["fps"],
                                       p["rate"]))
            events_of[rel] = [round(float(e), 4) for e in events]
            while len(pending) > 4 * workers or (pending and pending[0].done()):  # bounded memory
                pending.pop(0).result()
                bar.update()

        if part == "kinetics":
            _write_pretraining_set(root, clip, rng, p["per_class"], p["faulty_share"], p["seconds"])
        else:
            _write_ucf_stand_in(root, clip, rng, p["downstream_per_class"])
            _write_hmdb_stand_in(root, clip, rng, p["downstream_per_class"], p["seed"])
        for job in pending:
            job.result()
            bar.update()
    log(f"wrote the embedded {what} to {root} in {time.time() - t0:.1f}s ({len(events_of)} "
        f"clips, {p['size']}px, {p['fps']} fps, {p['rate']} Hz)")
    return events_of


def _write_pretraining_set(root, clip, rng, per_class, faulty_share, seconds):
    """Kinetics layout, 80% train / 20% val, a share of natural faulty positives (annotations.csv),
    and the official-style CSV."""
    annotations, csv_rows = [], []
    for c, (shape, motion, pitch, timbre) in enumerate(KINETICS_CLASSES):
        name = f"{shape}_{motion}"
        for k in range(per_class):
            split = "train" if k < int(0.8 * per_class) else "val"
            kind = ("events" if rng.random() >= faulty_share
                    else str(rng.choice(["music", "voice-over"])))
            yid = f"emb{c:02d}{k:04d}"  # unique over the dataset, as YouTube ids are
            rel = f"kinetics/{split}/{name}/{yid}_000000_{int(seconds):06d}.mp4"
            clip(rel, shape, str(rng.choice(list(PALETTE))), motion, "normal", pitch, timbre, kind)
            annotations.append({"path": rel, "split": split, "label": name, "audio": kind,
                                "faulty_positive": int(kind != "events")})
            csv_rows.append({"label": name, "youtube_id": yid, "time_start": 0,
                             "time_end": int(seconds), "split": split})
    for fname, rows in [("annotations.csv", annotations), ("kinetics_embedded.csv", csv_rows)]:
        with open(root / "kinetics" / fname, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _write_ucf_stand_in(root, clip, rng, per_class):
    """Shape x direction, any colour, any pitch; UCF101's split files, three folds by groups."""
    lists = {f: ([], []) for f in (1, 2, 3)}
    for shape, motion in UCF_CLASSES:
        name = f"{shape.capitalize()}{motion.capitalize()}"
        for k in range(per_class):
            group = k // 2 + 1
            rel = f"{name}/v_{name}_g{group:02d}_c{k % 2 + 1:02d}.mp4"
            clip(f"ucf/videos/{rel}", shape, str(rng.choice(list(PALETTE))), motion, "normal",
                 float(rng.uniform(200, 900)), str(rng.choice(["sine", "square", "saw"])))
            for fold in (1, 2, 3):
                test = group % 3 == fold - 1
                lists[fold][test].append(rel if test else
                                         f"{rel} {UCF_CLASSES.index((shape, motion)) + 1}")
    splits = root / "ucf" / "ucfTrainTestlist"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {s.capitalize()}{m.capitalize()}\n"
                                                 for i, (s, m) in enumerate(UCF_CLASSES)))
    for fold, (train, test) in lists.items():
        (splits / f"trainlist0{fold}.txt").write_text("\n".join(train) + "\n")
        (splits / f"testlist0{fold}.txt").write_text("\n".join(test) + "\n")


def _write_hmdb_stand_in(root, clip, rng, per_class, seed):
    """Shape x speed, any direction, colour and pitch; 70/30 per class and fold,
    HMDB51's split files."""
    splits = root / "hmdb" / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True, exist_ok=True)
    for shape, speed in HMDB_CLASSES:
        name = f"{shape}_{speed}"
        names = [f"{name}_{k:03d}.mp4" for k in range(per_class)]
        for n in names:
            clip(f"hmdb/videos/{name}/{n}", shape, str(rng.choice(list(PALETTE))),
                 str(rng.choice(["horizontal", "vertical", "diagonal"])), speed,
                 float(rng.uniform(200, 900)), str(rng.choice(["sine", "square", "saw"])))
        for fold in (1, 2, 3):
            test = set(np.random.default_rng(seed * 10 + fold).permutation(len(names))
                       [: round(0.3 * len(names))])
            (splits / f"{name}_test_split{fold}.txt").write_text(
                "".join(f"{n} {2 if k in test else 1}\n" for k, n in enumerate(names)))


def ensure(root="data/embedded", downstream=True, log=print):
    """The embedded dataset under root, generated on first use: the pre-training set, and with
    downstream=True the UCF and HMDB stand-ins too (train.py needs only the first; evaluate.py
    adds the rest). A partial part or one from another version of the generator is made again. A
    complete one made with other parameters (python embedded_dataset.py --hum 0.05
    --embedded-root X) is used as it is: it was made on purpose."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first uses at once: the second waits, then reads
        marker = root / "embedded.json"
        made = json.loads(marker.read_text()) if marker.exists() else {}
        if made.get("version") == VERSION and made.get("complete"):
            return root
        if made.get("version") == VERSION and "kinetics" in made.get("parts", []):
            if downstream:
                log(f"writing the embedded dataset's downstream stand-ins in {root}")
                write_downstream(root, log)
            return root
        log(f"generating the embedded dataset in {root} "
            f"({'first use' if not made else 'it was incomplete or older'})")
        return make(root, downstream=downstream, log=log)


def splits(root):
    """The embedded dataset's listings, through the real-data parsers: {"kinetics": f(split),
    "ucf": f(split, fold=1), "hmdb": f(split, fold=1)}, each returning (videos, classes)."""
    root = Path(root)
    return {"kinetics": lambda split: kinetics_folder(root / "kinetics", split),
            "ucf": lambda split, fold=1: ucf101(root / "ucf" / "videos",
                                                root / "ucf" / "ucfTrainTestlist", fold, split),
            "hmdb": lambda split, fold=1: hmdb51(root / "hmdb" / "videos",
                                                 root / "hmdb" / "testTrainMulti_7030_splits",
                                                 fold, split)}

# ----------------------------------------------------------------------------------------------
# The ground truth the dataset marks
# ----------------------------------------------------------------------------------------------
def natural_faulty_flags(videos):
    """Which videos the embedded dataset marks as natural faulty positives (annotations.csv beside
    the split folders); None for data without such a file."""
    if not videos:
        return None
    ann = Path(videos[0].path).parents[2] / "annotations.csv"
    if not ann.exists():
        return None
    with open(ann, newline="") as f:
        marked = {str(ann.parent.parent / r["path"]) for r in csv.DictReader(f)
                  if r["faulty_positive"] == "1"}
    return np.array([v.path in marked for v in videos])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedded-root", default="data/embedded", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="same seed, same clips")
    p.add_argument("--per-class", type=int, default=60,
                   help="pre-training clips per class (80%% train, 20%% val)")
    p.add_argument("--downstream-per-class", type=int, default=30,
                   help="clips per class of the UCF/HMDB stand-ins")
    p.add_argument("--faulty-share", type=float, default=0.1,
                   help="share of pre-training clips with unrelated audio "
                        "(natural faulty positives)")
    p.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    p.add_argument("--fps", type=int, default=16, help="frames per second")
    p.add_argument("--seconds", type=float, default=3.0, help="clip length")
    p.add_argument("--rate", type=int, default=16000, help="audio sample rate (Hz)")
    p.add_argument("--hum", type=float, default=HUM,
                   help="amplitude of the recording's hum, tied to the room's brightness (0: no "
                        "recording cue; the clicks' tones start at 0.5)")
    args = p.parse_args()
    if args.size % 2:
        p.error("--size must be even (H.264 with 4:2:0 chroma)")
    try:
        make(args.embedded_root, args.seed, args.per_class, args.downstream_per_class,
             args.faulty_share, args.size, args.fps, args.seconds, args.rate, args.hum)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
