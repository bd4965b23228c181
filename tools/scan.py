"""Sort every video under ROOT into usable and broken, with a reason per broken file.

    python tools/scan.py /data/k400/train                 # writes ROOT/broken.txt
    python tools/scan.py /data/UCF-101 --no-audio --broken-list ucf_broken.txt

The scan of listings.py that train.py runs on its split (give --min-seconds the clip's length: 2 for
the paper's, whose audio is 2 s; the default is train.py's CPU clip): it opens every file once (over
this process's cores), prints counts per reason (missing, zero bytes, cannot open / corrupt, no video
stream, no audio stream, too short for one clip) and caches what it found in ROOT/.scan-cache.json,
keyed by size and mtime, so a second scan opens only what changed.
"""
import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
from data import ClipSpec, Video  # noqa: E402
from listings import probe_all, scan, video_files  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a folder of videos, searched recursively")
    p.add_argument("--no-audio", action="store_true", help="do not require an audio stream")
    p.add_argument("--min-seconds", type=float, default=ClipSpec().shortest_file_seconds,
                   help="shortest usable file")
    p.add_argument("--broken-list", default=None,
                   help="where to write the broken files (default ROOT/broken.txt)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes opening files (default: this process's cores)")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        p.error(f"{root} is not a folder")
    videos = [Video(str(f)) for f in video_files(root, recursive=True)]
    spec = ClipSpec(need_audio=not args.no_audio, frames=1, fps=1 / max(args.min_seconds, 1e-3),
                    audio_seconds=max(args.min_seconds, 1e-3))
    out = Path(args.broken_list or root / "broken.txt")
    try:
        _, broken = scan(videos, spec, root / ".scan-cache.json", name=str(root),
                         probe_many=partial(probe_all, workers=args.workers))
        stop = None
    except FileNotFoundError as e:  # nothing usable: still list every file and its reason
        broken, stop = e.broken, f"tools/scan.py: {e}"
    out.write_text("".join(f"{path}\t{reason}\n" for path, reason in broken))
    print(f"broken files listed in {out}")
    if stop:
        sys.exit(stop)


if __name__ == "__main__":
    main()
