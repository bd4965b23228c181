"""Which files make a dataset, and which of them are broken: the Kinetics folder tree or CSV,
UCF101's and HMDB51's official splits, class subsets, and the scan that opens every file once and
sorts it into usable or broken with a reason (cached, so the next run does not open them again).

Listings are sorted, so that instance i (and its memory-bank slot) is the same file on every
machine. Nothing broken is dropped in silence: the scan names each file and why, and a run's
broken.txt keeps the list. data.py turns the usable files into clips.
"""
import csv
import json
import os
import random
from collections import Counter
from dataclasses import replace
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

import av

from data import ClipSpec, Video
from runs import atomic_write, progress

# Extensions of the video files real downloads come in (compared in lower case). A file in a class
# folder with another extension is not skipped silently: the scan opens it, and uses it or names it.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".mpg", ".mpeg", ".3gp",
                    ".flv", ".wmv", ".ogv", ".ts", ".mts", ".m2ts")
METADATA_EXTENSIONS = (".txt", ".csv", ".json", ".md")  # split lists, annotations, scan outputs


class SplitNotFound(FileNotFoundError):
    """A split that the data does not have (no folder, or no CSV row for it)."""


# ----------------------------------------------------------------------------------------------
# Listings of real datasets (sorted, so bank slots are the same on every machine)
# ----------------------------------------------------------------------------------------------
def video_files(folder, recursive=False):
    """Every file under folder that may be a video, sorted: hidden files and metadata (split
    lists, CSVs, JSON) are not; a file with an unknown extension is, so that the scan uses it or
    names it."""
    files = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(f for f in files if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() not in METADATA_EXTENSIONS)


def _align_classes(found, classes, where, log):
    """The class list of a split: its own sorted folders / labels, or, given `classes` (the
    training split's), that list, so that label c means the same class in every split. Classes of
    this split that the list lacks are left out, and said so."""
    found = sorted(set(found))
    if classes is None:
        return found
    extra = [c for c in found if c not in classes]
    if extra:
        log(f"{where}: {len(extra)} class(es) not among the {len(classes)} training classes, "
            f"left out: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return list(classes)


def kinetics_folder(root, split, classes=None, log=print):
    """root/<split>/<class>/<video> -> (videos, classes). With `classes`, labels index that list."""
    base = Path(root) / split
    if not base.is_dir():
        raise SplitNotFound(f"no folder {base}: expected Kinetics laid out as "
                            "ROOT/<split>/<class>/<video>")
    found = [p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    classes = _align_classes(found, classes, str(base), log)
    videos = [Video(str(f), label) for label, c in enumerate(classes) if (base / c).is_dir()
              for f in video_files(base / c)]
    stray = [p for p in base.iterdir() if p.is_file() and not p.name.startswith(".")] + \
            [p for c in classes if (base / c).is_dir() for p in (base / c).iterdir() if p.is_dir()]
    if stray:  # outside the layout: not videos of a class, but not left out in silence either
        log(f"{base}: {len(stray)} item(s) outside ROOT/<split>/<class>/<video> ignored, "
            f"e.g. {stray[0]}")
    return videos, classes


CSV_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


def check_csv_columns(csv_path):
    """A ValueError naming the file and the columns it lacks, unless it has all of CSV_COLUMNS."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        found = csv.DictReader(f).fieldnames or []
    missing = [c for c in CSV_COLUMNS if c not in found]
    if missing:
        raise ValueError(f"{csv_path}: no column {', '.join(missing)} (a Kinetics CSV has the "
                         f"columns {', '.join(CSV_COLUMNS)}; found {', '.join(found) or 'none'})")


def kinetics_csv(csv_path, root, split, classes=None, log=print):
    """The official CSV (label, youtube_id, time_start, time_end, split) with clips stored as
    root/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.<ext> (the common downloaders' naming;
    any video container). Rows whose file is missing are kept: the scan reports them. With
    `classes`, labels index that list."""
    check_csv_columns(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if not rows:
        raise SplitNotFound(f"{csv_path}: no row with split == {split!r} (Kinetics ships one CSV "
                            f"per split: give the one that has it)")
    classes = _align_classes([r["label"] for r in rows], classes, f"{csv_path} [{split}]", log)
    stored = {}  # downloaders keep the container YouTube served (.mp4, .mkv, .webm): match by name

    def path_of(row):
        folder = Path(root) / split / row["label"]
        if folder not in stored:  # a known video extension wins over a thumbnail or extracted audio
            files = sorted(video_files(folder) if folder.is_dir() else [],
                           key=lambda f: (f.suffix.lower() in VIDEO_EXTENSIONS, f.name))
            stored[folder] = {f.stem: f for f in files}
        stem = (f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_"
                f"{int(float(row['time_end'])):06d}")
        return str(stored[folder].get(stem, folder / f"{stem}.mp4"))  # absent: the scan names it
    videos = sorted(Video(path_of(r), classes.index(r["label"]))
                    for r in rows if r["label"] in classes)
    return videos, classes


def keep_classes(videos, classes, class_names):
    """Only the named classes, relabelled 0..C-1 in sorted name order."""
    missing = sorted(set(class_names) - set(classes))
    if missing:
        raise ValueError(f"--classes names classes not in the dataset: {missing}")
    keep = sorted(set(class_names))
    return [replace(v, label=keep.index(classes[v.label]))
            for v in videos if classes[v.label] in keep], keep


def balanced_subset(videos, num_classes, num_videos, seed=0):
    """A class-balanced, seeded subset of num_videos (round robin over the classes, as far as each
    class has videos), sorted by path."""
    if num_videos >= len(videos):
        return videos
    rng = random.Random(seed)
    per_class = [[v for v in videos if v.label == c] for c in range(num_classes)]
    for vs in per_class:
        rng.shuffle(vs)
    picked = []
    while len(picked) < num_videos:
        for vs in per_class:
            if vs and len(picked) < num_videos:
                picked.append(vs.pop())
    return sorted(picked, key=lambda v: v.path)


def stored_as(path):
    """The file a split list names, or its prepared copy (`tools/prepare.py` writes v_x.avi as
    v_x.mp4); as named when neither exists, for the scan to report it missing."""
    path = Path(path)
    prepared = path.with_suffix(".mp4")
    return str(prepared if not path.exists() and prepared.exists() else path)


def ucf101(root, splits_dir, fold=1, split="train"):
    """UCF101: classInd.txt ("1 ApplyEyeMakeup"), trainlist0F.txt ("Class/v_x.avi 1"),
    testlist0F.txt."""
    splits_dir = Path(splits_dir)
    with open(splits_dir / "classInd.txt") as f:
        classes = [line.split()[1] for line in f if line.strip()]
    with open(splits_dir / f"{split}list0{fold}.txt") as f:
        rels = [line.split()[0] for line in f if line.strip()]
    return sorted(Video(stored_as(Path(root) / r), classes.index(r.split("/")[0]))
                  for r in rels), classes


def hmdb51(root, splits_dir, fold=1, split="train"):
    """HMDB51: <class>_test_split<F>.txt, lines "video.avi 1|2|0" (1 train, 2 test, 0 unused)."""
    wanted = {"train": "1", "test": "2"}[split]
    files = sorted(Path(splits_dir).glob(f"*_test_split{fold}.txt"))
    if not files:
        raise FileNotFoundError(f"no *_test_split{fold}.txt in {splits_dir}")
    classes = [f.name[: -len(f"_test_split{fold}.txt")] for f in files]
    videos = []
    for label, f in enumerate(files):
        for line in f.read_text().splitlines():
            if line.strip() and line.split()[1] == wanted:
                videos.append(
                    Video(stored_as(Path(root) / classes[label] / line.split()[0]), label))
    return sorted(videos), classes


def pretraining_split(root, split, spec, csv_path=None, class_names=None, subset=None, seed=0,
                      classes=None, probe_many=None, log=print):
    """Kinetics-style listing (folder or CSV) -> named classes -> scan -> class-balanced subset.
    Returns (usable videos, classes, broken [(path, reason)]); the scan is cached beside the data.
    `classes` (the training split's list) makes another split's labels mean the same classes.
    The subset is drawn from the usable videos, so broken files do not unbalance it."""
    root = Path(root)
    if csv_path:
        videos, classes = kinetics_csv(csv_path, root, split, classes, log)
    else:
        videos, classes = kinetics_folder(root, split, classes, log)
    if class_names:
        videos, classes = keep_classes(videos, classes, class_names)
    usable, broken = scan(videos, spec, root / f".scan-cache-{split}.json",
                          name=f"{root} [{split}]", probe_many=probe_many, log=log)
    if subset:
        usable = balanced_subset(usable, len(classes), subset, seed)
    return usable, classes, broken


# ----------------------------------------------------------------------------------------------
# The scan: open every file once, sort it into usable or broken with a reason, cache the result
# ----------------------------------------------------------------------------------------------
def probe(path, need_audio=True, min_seconds=0.0):
    """(duration, None) for a usable file, (0, reason) for a broken one."""
    duration, reason = _probe(path, need_audio, min_seconds)
    suffix = Path(path).suffix.lower()
    if reason and suffix not in VIDEO_EXTENSIONS and Path(path).exists():  # say why it was tried
        reason += f" (and {suffix or 'no extension'} is not a known video extension)"
    return duration, reason


def _probe(path, need_audio, min_seconds):
    p = Path(path)
    if not p.exists():
        return 0.0, "missing file"
    if p.stat().st_size == 0:
        return 0.0, "zero bytes"
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                return 0.0, "no video stream"
            if need_audio and not c.streams.audio:
                return 0.0, "no audio stream"
            streams = [c.streams.video[0]] + ([c.streams.audio[0]] if need_audio else [])
            duration = min(float(s.duration * s.time_base) if s.duration
                           else (c.duration or 0) / av.time_base for s in streams)
            if duration <= 0:
                return 0.0, "unknown duration"
            for s in streams:  # decode one packet per stream: catches corrupt data the header hides
                next(c.decode(s))
                c.seek(0)
    except StopIteration:
        return 0.0, "corrupt: a stream has no decodable frame"
    except Exception as e:  # noqa: BLE001 -- what FFmpeg or PyAV raise on this file is its reason
        return 0.0, f"cannot open / corrupt: {type(e).__name__}"
    if duration < min_seconds:
        return duration, f"too short: {duration:.2f}s < {min_seconds:.2f}s"
    return duration, None


def available_cores():
    """The cores this process may run on (a cluster job's allocation, not the whole node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_processes(fn, items, workers, crashed=None):
    """(item, fn(item)) for each item, computed in `workers` processes, in the order they finish.
    At most 2 x workers items are handed out at a time, so Ctrl-C stops within a few files; a worker
    that dies (FFmpeg crashing on a file) takes only that file with it: the files it might have been
    on are retried one by one, and the one that kills a worker again gives crashed(item)."""
    items, retry = list(items), []
    while items or retry:
        one_by_one = not items
        batch, items = (retry[:1], items) if one_by_one else (items, [])
        retry = retry[1:] if one_by_one else retry
        with ProcessPoolExecutor(1 if one_by_one else workers) as pool:
            pending, queue = {}, iter(batch)
            try:
                while True:
                    while len(pending) < 2 * workers and (item := next(queue, None)) is not None:
                        pending[pool.submit(fn, item)] = item
                    if not pending:
                        break
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for job in done:
                        result = job.result()  # a dead worker raises here, its item still pending
                        yield pending.pop(job), result
            except BrokenProcessPool:
                lost = list(pending.values())
                if one_by_one:
                    yield lost[0], crashed(lost[0])
                else:
                    retry += lost
                    items = list(queue)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def probe_all(paths, need_audio, min_seconds, quiet=False, workers=None):
    """probe() for each path, over `workers` processes (default: this machine's cores; the default
    of scan's `probe_many`). Opening a file is mostly FFmpeg's work, so the processes scale with the
    cores: 240k Kinetics files take about an hour on one core."""
    workers = min(workers or available_cores(), max(1, len(paths) // 8))  # a pool is slow to start
    bar = dict(total=len(paths), desc="scan", unit="file", disable=quiet)
    one = partial(probe, need_audio=need_audio, min_seconds=min_seconds)
    if workers == 1:
        return [one(p) for p in progress(paths, **bar)]
    found = dict(progress(in_processes(one, paths, workers, crashed=lambda p: (
        0.0, "cannot open / corrupt: FFmpeg crashed on it")), **bar))
    return [found[p] for p in paths]


def scan(videos, spec=ClipSpec(), cache_path=None, name="dataset", probe_many=None, log=print):
    """Probe every video once (cached by path, size and mtime) -> (usable videos with durations,
    broken [(path, reason)]). Prints a summary with counts per reason; no usable file is an error.
    probe_many(paths, need_audio, min_seconds) -> [(duration, reason)] probes the files the cache
    does not know (default: probe_all; train.py spreads them over a multi-GPU run's processes)."""
    cache = {}
    if cache_path and Path(cache_path).exists():
        try:
            cache = json.loads(Path(cache_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log(f"scan: the cache {cache_path} is unreadable; scanning again "
                "(it will be rewritten)")
    key_of = lambda p: (f"{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}:"
                        f"{spec.need_audio}:{spec.shortest_file_seconds}"
                        if os.path.exists(p) else "missing")
    keys = {v.path: key_of(v.path) for v in videos}
    todo = [v.path for v in videos if cache.get(v.path, {}).get("key") != keys[v.path]]
    probed = dict(zip(todo, (probe_many or probe_all)(todo, spec.need_audio,
                                                      spec.shortest_file_seconds)))
    usable, broken, fresh = [], [], {}
    for v in videos:
        key = keys[v.path]
        duration, reason = (probed[v.path] if v.path in probed
                            else (cache[v.path]["duration"], cache[v.path]["reason"]))
        fresh[v.path] = {"key": key, "duration": duration, "reason": reason}
        if reason:
            broken.append((v.path, reason))
        else:
            usable.append(replace(v, duration=duration))
    if cache_path:
        try:
            atomic_write(cache_path, json.dumps(fresh))
        except OSError as e:
            log(f"scan: cannot write the cache {cache_path} ({e}); the next run will scan again")
    counts = Counter(reason.split(":")[0] for _, reason in broken)
    log(f"scan {name}: {len(usable)} usable, {len(broken)} broken" +
        "".join(f"\n  {n:5d}  {r}" for r, n in sorted(counts.items())))
    if not usable:
        error = FileNotFoundError(f"no usable video in {name}: {len(broken)} files, all broken "
                                  f"(first: {broken[0] if broken else 'no files at all'})")
        error.broken = broken  # for a caller that lists them
        raise error
    return usable, broken
