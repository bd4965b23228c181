"""The path a researcher takes with real downloads, end to end, on a Kinetics-style download the tests
write themselves: several containers and codecs, files without audio, too short, zero bytes,
truncated, unknown extensions, odd names, a class that only one split has; the official CSVs
(train rows only in train.csv, as Kinetics ships them); UCF101 and HMDB51 folders with their
official split files. Each test names the behaviour it pins down."""
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import bench_decoding
import bench_step
import data
import evaluate
import gpu_check
import listings
import plots
import prepare
import runs
import train
from test_pipeline import write_av

# one clip = 4 frames at 4 fps (1 s) and 1 s of audio; the fixture's files are 2 s long
FLAGS = ["--frames", "4", "--fps", "4", "--crop", "16", "--n-mels", "32", "--batch-size", "8",
         "--num-negatives", "8", "--workers", "0", "--warmup-epochs", "1"]
SPEC = data.ClipSpec(frames=4, fps=4.0, size=16, audio_seconds=1.0, n_mels=32)
FOOTBALL = "passing American football (in game)"   # Kinetics labels have spaces and parentheses


def clip_name(k, ext=".mp4"):
    """The downloaders' naming of a Kinetics clip: <youtube_id>_<start:06d>_<end:06d>.<ext>."""
    return f"yt{k:09d}_{10 * k:06d}_{10 * k + 10:06d}{ext}"


def write_channel_change(path):
    """An MPEG-TS recording whose audio goes from mono to stereo after 2 s (two recordings joined,
    as broadcast captures are): the channel count changes mid-file."""
    write_av(Path(path).with_suffix(".a"), fmt="mpegts", vcodec="mpeg2video", acodec="mp2", layout="mono", fps=25)
    write_av(Path(path).with_suffix(".b"), fmt="mpegts", vcodec="mpeg2video", acodec="mp2", layout="stereo", fps=25,
             offset=2.0)
    Path(path).write_bytes(Path(path).with_suffix(".a").read_bytes() + Path(path).with_suffix(".b").read_bytes())
    Path(path).with_suffix(".a").unlink()
    Path(path).with_suffix(".b").unlink()
    return str(path)


# (class, file, how to write it, usable?) -- the training split of the download
GOOD = {
    "abseiling": [(clip_name(0), {}), (clip_name(1), {}),
                  (clip_name(2, ".mkv"), dict(fmt="matroska", acodec="pcm_s16le", layout="stereo", rate=48000)),
                  (clip_name(3, ".webm"), dict(fmt="webm", vcodec="libvpx-vp9", acodec="libopus", rate=48000))],
    "playing guitar": [(clip_name(10, ".avi"), dict(fmt="avi", vcodec="mpeg4", acodec="libmp3lame", rate=44100)),
                       (clip_name(11), dict(rate=44100, layout="stereo", size=(50, 38))),
                       (clip_name(12, ".mpg"), dict(fmt="mpeg", vcodec="mpeg1video", acodec="mp2", fps=25)),
                       (clip_name(13, ".MP4"), {})],
    FOOTBALL: [(clip_name(20, ".m4v"), dict(fmt="mp4")), (clip_name(21, ".mov"), dict(fmt="mov")),
               (clip_name(22, ".ts"), "channel change"), (clip_name(23, ".vid"), dict(fmt="mp4"))],
    "zumba": [(clip_name(30 + k), {}) for k in range(4)],              # no held-out videos of this class
}
BROKEN = {  # file -> the start of the reason the scan must give
    ("abseiling", clip_name(4)): "no audio stream",
    ("abseiling", clip_name(5)): "too short",
    ("playing guitar", clip_name(14)): "zero bytes",
    ("playing guitar", clip_name(15)): "cannot open / corrupt",        # truncated download
    (FOOTBALL, clip_name(24, ".part")): "cannot open / corrupt",      # a download that never finished
}
MISSING_ROW = ("zumba", clip_name(39))                                 # in train.csv, never downloaded
HELD_OUT = {"abseiling": [40, 41], "playing guitar": [42, 43], FOOTBALL: [44], "yoga": [45]}  # yoga: val only


@pytest.fixture(scope="session")
def download(tmp_path_factory):
    """A Kinetics download (folder layout + official CSVs) and UCF101 / HMDB51 in their formats."""
    root = tmp_path_factory.mktemp("download")
    k400, rows = root / "kinetics", {"train": [], "val": []}
    for label, files in GOOD.items():
        for name, how in files:
            (k400 / "train" / label).mkdir(parents=True, exist_ok=True)
            path = k400 / "train" / label / name
            write_channel_change(path) if how == "channel change" else write_av(path, **how)
    good = k400 / "train" / "abseiling" / clip_name(0)
    for (label, name), reason in BROKEN.items():
        path = k400 / "train" / label / name
        if reason == "no audio stream":
            write_av(path, acodec=None)
        elif reason == "too short":
            write_av(path, seconds=0.5)
        elif reason == "zero bytes":
            path.write_bytes(b"")
        else:
            path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (k400 / "train" / "abseiling" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")   # hidden: not a video
    for label, ks in HELD_OUT.items():
        (k400 / "val" / label).mkdir(parents=True)
        for k in ks:
            write_av(k400 / "val" / label / clip_name(k))
    for split in ("train", "val"):
        for folder in sorted((k400 / split).iterdir()):
            for f in sorted(folder.iterdir()):
                if not f.name.startswith(".") and f.suffix != ".part":
                    yid, start, end = f.stem.rsplit("_", 2)
                    rows[split].append(f"{folder.name},{yid},{int(start)},{int(end)},{split}")
    rows["train"].append(f"{MISSING_ROW[0]},{MISSING_ROW[1].rsplit('_', 2)[0]},390,400,train")
    header = "label,youtube_id,time_start,time_end,split\n"
    (root / "train.csv").write_text(header + "\n".join(_quote(r) for r in rows["train"]) + "\n")
    (root / "validate.csv").write_text(header + "\n".join(_quote(r) for r in rows["val"]) + "\n")

    # UCF101: UCF-101/<Class>/v_<Class>_gNN_cMM.avi; group 1 is the test set of fold 1
    ucf, lists = root / "UCF-101", {"train": [], "test": []}
    for c, name in enumerate(["ApplyEyeMakeup", "Archery", "BabyCrawling"]):
        (ucf / name).mkdir(parents=True)
        for g in range(1, 5):
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            write_av(ucf / rel, fmt="avi", vcodec="mpeg4", acodec=None if g % 2 else "libmp3lame", rate=44100)
            lists["test" if g == 1 else "train"].append(rel if g == 1 else f"{rel} {c + 1}")
    (ucf / "Archery" / "v_Archery_g04_c01.avi").write_bytes(b"")                     # broken in the train list
    splits = root / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 BabyCrawling\n")
    (splits / "trainlist01.txt").write_text("\n".join(lists["train"]) + "\n")
    (splits / "testlist01.txt").write_text("\n".join(lists["test"]) + "\n")

    # HMDB51: hmdb51/<class>/<name>.avi, <class>_test_split1.txt with 1 (train), 2 (test), 0 (unused)
    hmdb, hsplits = root / "hmdb51", root / "testTrainMulti_7030_splits"
    hsplits.mkdir()
    for name in ("brush_hair", "cartwheel", "catch"):
        (hmdb / name).mkdir(parents=True)
        files = [f"Veoh_Alpha_Dog_{k}_{name}_f_nm_np1_fr_goo_{k}.avi" for k in range(3)] + [f"#{name}!_&_u_cm_np1_ba_med_0.avi"]
        for f in files:
            write_av(hmdb / name / f, fmt="avi", vcodec="mpeg4", acodec=None)
        (hsplits / f"{name}_test_split1.txt").write_text("".join(f"{f} {t}\n" for f, t in zip(files, (1, 1, 2, 0))))
    return root


def _quote(row):
    label, rest = row.split(",", 1)
    return f'"{label}",{rest}' if "," in label or " " in label else row


def run_train(root, out, *flags):
    train.main(["--data-root", str(root / "kinetics"), "--out", str(out), *FLAGS, *flags])
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def downstream_flags(root):
    return ["--ucf-root", str(root / "UCF-101"), "--ucf-splits", str(root / "ucfTrainTestlist"),
            "--hmdb-root", str(root / "hmdb51"), "--hmdb-splits", str(root / "testTrainMulti_7030_splits")]


def tree(folder):
    """Every file under folder with its bytes (what a command must leave alone)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Listing and scan: every file is used or named
# ----------------------------------------------------------------------------------------------
def test_every_file_of_a_download_is_used_or_named(download):
    """Any container FFmpeg reads is used, whatever its extension (.mpg, .m4v, .MP4, an unknown
    .vid); every other file of a class folder is named with a reason; hidden files are not videos."""
    videos, classes = listings.kinetics_folder(download / "kinetics", "train")
    assert classes == sorted(GOOD)
    usable, broken = listings.scan(videos, SPEC, log=lambda *a: None)
    assert sorted(Path(v.path).name for v in usable) == sorted(n for files in GOOD.values() for n, _ in files)
    reasons = {(Path(p).parent.name, Path(p).name): r for p, r in broken}
    assert set(reasons) == set(BROKEN)
    for key, start in BROKEN.items():
        assert reasons[key].startswith(start), (key, reasons[key])
    assert ".part is not a known video extension" in reasons[(FOOTBALL, clip_name(24, ".part"))]


def test_csv_finds_clips_in_any_container_and_names_missing_rows(download):
    """The official CSV gives a file name without its container; a clip stored as .mkv or .webm is
    found, and a row whose clip was never downloaded is named as missing."""
    videos, classes = listings.kinetics_csv(download / "train.csv", download / "kinetics", "train")
    assert classes == sorted(GOOD)
    names = {Path(v.path).name for v in videos}
    assert {clip_name(2, ".mkv"), clip_name(3, ".webm"), clip_name(12, ".mpg"), clip_name(23, ".vid")} <= names
    usable, broken = listings.scan(videos, SPEC, log=lambda *a: None)
    assert len(usable) == 16
    assert (str(download / "kinetics" / "train" / "zumba" / MISSING_ROW[1]), "missing file") in broken
    with pytest.raises(listings.SplitNotFound, match="no row with split == 'val'"):
        listings.kinetics_csv(download / "train.csv", download / "kinetics", "val")


def test_csv_prefers_the_video_to_a_thumbnail_or_extracted_audio(download, tmp_path):
    """yt-dlp leaves a .webp thumbnail beside a clip, pipelines extract .wav files: a CSV row names
    the clip without its container, and the file with a video extension is the one taken. A CSV
    saved by a spreadsheet (byte-order mark) reads the same."""
    root = tmp_path / "k"
    (root / "train" / "zumba").mkdir(parents=True)
    clip = write_av(root / "train" / "zumba" / clip_name(7))
    (root / "train" / "zumba" / clip_name(7, ".webp")).write_bytes(b"RIFF....WEBP")
    (root / "train" / "zumba" / clip_name(7, ".wav")).write_bytes(b"RIFF....WAVE")
    table = tmp_path / "train.csv"
    table.write_text("\ufefflabel,youtube_id,time_start,time_end,split\nzumba,yt000000007,70,80,train\n", encoding="utf-8")
    videos, _ = listings.kinetics_csv(table, root, "train")
    assert [v.path for v in videos] == [clip]


def test_csv_without_a_column_is_named(download, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    bad.write_text("label,youtube_id,time_start,split\nabseiling,yt000000000,0,train\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: no column time_end")):
        listings.kinetics_csv(bad, download / "kinetics", "train")
    with pytest.raises(SystemExit):
        run_train(download, tmp_path / "run", "--csv", str(bad))
    assert "no column time_end" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_held_out_labels_follow_the_training_classes(download):
    """A held-out split missing a class (zumba) or with one more (yoga): label c still means the
    training split's class c, and the extra class is left out with a message."""
    _, classes = listings.kinetics_folder(download / "kinetics", "train")
    said = []
    for val, _ in (listings.kinetics_folder(download / "kinetics", "val", classes, log=said.append),
                   listings.kinetics_csv(download / "validate.csv", download / "kinetics", "val", classes, log=said.append)):
        assert {Path(v.path).parent.name for v in val} == {"abseiling", "playing guitar", FOOTBALL}
        assert all(classes[v.label] == Path(v.path).parent.name for v in val)
    assert len(said) == 2 and all("yoga" in s and "left out" in s for s in said)


def test_subset_is_drawn_from_the_usable_videos(download):
    """--subset draws from what the scan kept: broken files do not unbalance the classes."""
    for seed in range(4):
        usable, classes, _ = listings.pretraining_split(download / "kinetics", "train", SPEC, subset=8, seed=seed,
                                                        log=lambda *a: None)
        assert np.bincount([v.label for v in usable], minlength=4).tolist() == [2, 2, 2, 2]


def test_audio_whose_channels_change_mid_file_decodes(download):
    """Mono, then stereo, in one window: each run of frames is resampled on its own."""
    path = download / "kinetics" / "train" / FOOTBALL / clip_name(22, ".ts")
    _, wave = data.decode_clip(path, 1.5, SPEC)
    assert wave.shape == (16000,) and wave[:8000].std() > 0.02 and wave[8000:].std() > 0.02


def test_any_exception_while_decoding_drops_the_clip_with_its_name(download, monkeypatch):
    """Not only FFmpeg's errors: whatever a file makes the decoder raise, the clip is reported with
    the file's name and the exception's type, and left out (never replaced by another video)."""
    def boom(*args, **kwargs):
        raise RuntimeError("the decoder met something new")
    monkeypatch.setattr(data, "_decode_frames", boom)
    path = download / "kinetics" / "train" / "zumba" / clip_name(30)
    item = data.AVClips([data.Video(str(path), 0, 2.0)], SPEC)[0]
    assert item["index"] == 0 and str(path) in item["error"] and "RuntimeError" in item["error"]


# ----------------------------------------------------------------------------------------------
# train.py -> evaluate.py -> plots.py on the download
# ----------------------------------------------------------------------------------------------
def test_folder_download_end_to_end(download, tmp_path, capsys, monkeypatch):
    """train.py (with its end-of-run summary) -> evaluate.py (UCF101, HMDB51 and the pre-training
    set, with exactly the run's instances: the file without audio that training left out does not
    come back) -> plots.py run; W(s) in the histogram is drawn with the run's own κ and w_min."""
    out = tmp_path / "run"
    log = run_train(download, out, "--epochs", "2", "--n0", "0.25", "--mode", "weighted", "--kappa", "0.3",
                    "--w-min", "0.1")
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]
    said = capsys.readouterr().out
    assert "16 videos (4 classes, 5 broken left out)" in said and "video retrieval, 5 held-out val clips" in said
    broken = (out / "broken.txt").read_text()
    assert all(name in broken for _, name in BROKEN)
    results = json.loads((out / "results.json").read_text())
    assert {"R@1", "R@5"} <= set(results["train_summary_retrieval"]) and results["detection_injected"]["n_faulty"] == 4

    r = evaluate.main([str(out), *downstream_flags(download), "--clips", "2", "--ft-epochs", "1", "--workers", "0",
                       "--queries", "3", "--ft-repeats", "2"])
    each = r["ucf"]["finetune_video_top1_each"]                                     # two fine-tunings, their mean
    assert len(each) == 2 and r["ucf"]["finetune_video_top1"] == pytest.approx(sum(each) / 2)
    assert r["ucf"]["classes"] == 3 and r["ucf"]["train_videos"] == 8 and r["ucf"]["test_videos"] == 3
    assert r["hmdb"]["classes"] == 3 and r["hmdb"]["train_videos"] == 6 and r["hmdb"]["test_videos"] == 3
    assert set(r["per_class_R@1"]) == {"abseiling", "playing guitar", FOOTBALL}     # labels by training class
    assert len(r["most_likely_faulty"]) == 16 and sum(x["injected"] for x in r["most_likely_faulty"]) == 4
    said = capsys.readouterr().out
    assert "v_Archery_g04_c01.avi" in said and "zero bytes" in said                 # the broken UCF file, named
    assert "of the 16 most likely faulty pairs: 4 injected, 12 not injected" in said

    drawn = []
    real = plots.faulty_positive_weights
    monkeypatch.setattr(plots, "faulty_positive_weights",
                        lambda s, mu, sigma, d, kappa, w_min: drawn.append((d, kappa, w_min)) or real(s, mu, sigma, d, kappa, w_min))
    plots.main(["run", str(out), "--out", str(tmp_path / "figs")])
    assert drawn and {(k, w) for _, k, w in drawn} == {(0.3, 0.1)} and -2.0 in {d for d, _, _ in drawn}
    for name in ("fig3_per_class_r1", "fig4_retrievals", "score_histogram", "training_curves"):
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 5000


def test_csv_with_train_rows_only_then_resumed_with_the_val_csv(download, tmp_path, capsys):
    """Kinetics' train.csv has train rows only: the run ends with its detection summary and says why
    there is no retrieval (no traceback, results.json written). Resumed once with --val-csv, it
    continues from the checkpoint and its summary retrieves held-out clips; each epoch is logged once."""
    out = tmp_path / "run"
    run_train(download, out, "--csv", str(download / "train.csv"), "--epochs", "1", "--n0", "0.25")
    said = capsys.readouterr().out
    assert "no held-out split for the retrieval summary" in said and "no row with split == 'val'" in said
    results = json.loads((out / "results.json").read_text())
    assert "detection_injected" in results and "train_summary_retrieval" not in results
    log = run_train(download, out, "--csv", str(download / "train.csv"), "--val-csv", str(download / "validate.csv"),
                    "--epochs", "2", "--n0", "0.25", "--resume", "--log-every", "1")
    assert "resumed" in capsys.readouterr().out
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]
    assert "train_summary_retrieval" in json.loads((out / "results.json").read_text())
    r = evaluate.main([str(out), "--skip", "ucf", "hmdb", "--clips", "2", "--workers", "0", "--queries", "2"])
    assert "pretrain_retrieval" in r and set(r["per_class_R@1"]) <= set(GOOD)


def test_a_held_out_csv_whose_videos_are_all_missing_ends_with_the_detection_summary(download, tmp_path, capsys):
    """validate.csv given, its videos never downloaded: the run still ends with its summary (detection),
    and says why there is no retrieval."""
    lonely = tmp_path / "validate.csv"
    lonely.write_text("label,youtube_id,time_start,time_end,split\nabseiling,ytnothere00,0,10,val\n")
    out = tmp_path / "run"
    run_train(download, out, "--csv", str(download / "train.csv"), "--val-csv", str(lonely), "--epochs", "1",
              "--n0", "0.25")
    assert "no held-out split for the retrieval summary: no usable video" in capsys.readouterr().out
    assert "detection_injected" in json.loads((out / "results.json").read_text())


def test_two_processes_end_to_end_name_every_decode_error(download, tmp_path):
    """torchrun with 2 CPU processes on the download, summary included: a clip that fails on rank 1
    is named there at once and counted in rank 0's epoch log, and the summary (features shared out
    over the ranks, held-out split scanned by both) is written. The failing files passed an earlier
    scan and were damaged after it (size and mtime kept, so the scan's cache still vouches for them)."""
    root = tmp_path / "download"
    shutil.copytree(download / "kinetics", root / "kinetics")
    usable, _, _ = listings.pretraining_split(root / "kinetics", "train", SPEC, log=lambda *a: None)  # fills the cache
    on_rank_1 = set()
    for epoch in (0, 1):  # DistributedSampler's order: randperm(N) seeded with seed + epoch, rank r takes r::2
        order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(0 + epoch)).tolist()
        on_rank_1.add(order[1::2][0])
    victims = [Path(usable[i].path) for i in sorted(on_rank_1)]
    for victim in victims:
        stat = victim.stat()
        victim.write_bytes(b"\0" * stat.st_size)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data-root", str(root / "kinetics"), "--out", str(out), *FLAGS, "--epochs", "2", "--n0", "0.25",
           "--device", "cpu"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1] data error" in done.stderr
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["kind"] == "epoch"]
    for r in epochs:  # each victim fails as a video; an injected pair may also take its audio from one
        assert r["data_errors"] == len(r["data_error_files"]) >= len(victims)
        assert all(any(v.name in e for v in victims) for e in r["data_error_files"])
        assert all(any(e.startswith(str(v)) for e in r["data_error_files"]) for v in victims)
    assert all(r["bank_spread_across_ranks"] == 0.0 for r in epochs)
    assert "video retrieval, 5 held-out val clips" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert "train_summary_retrieval" in results and "detection_injected" in results


# ----------------------------------------------------------------------------------------------
# The run folder: never damaged by a refused command or a benchmark; each epoch logged once
# ----------------------------------------------------------------------------------------------
def test_bench_and_a_refused_resume_leave_the_run_folder_alone(download, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_train(download, out, "--epochs", "1", "--n0", "0.25", "--no-eval")
    before = tree(out)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")                 # where train.py's default --out would go
    bench = bench_step.main(["--data-root", str(download / "kinetics"), *FLAGS, "--steps", "1"])
    assert set(bench["median"]) == set(bench_step.PARTS)
    assert tree(out) == before and not any((tmp_path / "cwd").iterdir())
    with pytest.raises(SystemExit):                                # other injected pairs: refused
        run_train(download, out, "--epochs", "2", "--n0", "0.5", "--resume", "--no-eval")
    assert tree(out) == before


def test_an_epoch_is_logged_only_once_its_checkpoint_is_saved(download, tmp_path, monkeypatch):
    """Killed while saving epoch 2 (or in the middle of it): the log keeps no record of epoch 2, and
    the resumed run logs every epoch and every step once."""
    out = tmp_path / "run"
    real, calls = runs.save_checkpoint, []

    def dies_at_second_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(obj, path)
    monkeypatch.setattr(runs, "save_checkpoint", dies_at_second_save)
    with pytest.raises(SystemExit):  # the Ctrl-C note and exit code 130: test_pipeline.py pins them
        run_train(download, out, "--epochs", "3", "--log-every", "1", "--no-eval")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1] and {r["epoch"] for r in log} == {1, 2}
    monkeypatch.setattr(runs, "save_checkpoint", real)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "epoch": 2, "st')                            # a line cut short by the kill
    log = run_train(download, out, "--epochs", "3", "--log-every", "1", "--no-eval", "--resume")
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2, 3]
    steps = [r["step"] for r in log if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and len(steps) == 3 * 2


def test_an_epoch_saved_but_not_yet_logged_is_logged_on_resume(download, tmp_path, monkeypatch):
    """Killed between saving epoch 2's checkpoint and writing its log record: the resumed run writes
    that record from the checkpoint, so the curves have every epoch."""
    out = tmp_path / "run"
    real = runs.RunLog.write

    def dies_logging_epoch_2(self, **record):
        if record["kind"] == "epoch" and record["epoch"] == 2:
            raise KeyboardInterrupt
        real(self, **record)
    monkeypatch.setattr(runs.RunLog, "write", dies_logging_epoch_2)
    with pytest.raises(SystemExit):
        run_train(download, out, "--epochs", "3", "--no-eval")
    monkeypatch.setattr(runs.RunLog, "write", real)
    log = run_train(download, out, "--epochs", "3", "--no-eval", "--resume")
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2, 3]


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be >= 1"), (["--sample-rate", "100"], "--sample-rate must be >= 1000"),
    (["--n-mels", "500"], "--n-mels must be in \\[1, 321\\]"), (["--subset", "-3"], "--subset must be >= 2"),
    (["--batch-size", "2"], "--batch-size must be >= 3, got 2"),
    (["--num-negatives", "16"], "--num-negatives 16 must be smaller than the dataset \\(16 usable videos\\)"),
    (["--classes", "EMPTY"], "names no class"),
    (["--val-csv", "VALCSV"], "--val-csv needs --csv"),
])
def test_invalid_values_stop_before_anything_is_written(download, tmp_path, capsys, flags, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    flags = [f.replace("EMPTY", str(tmp_path / "empty.txt")).replace("VALCSV", str(download / "validate.csv"))
             for f in flags]
    with pytest.raises(SystemExit):
        run_train(download, tmp_path / "run", *flags)
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resume_on_a_gpu(download, tmp_path):
    """The negatives' generator state comes back as a CPU byte tensor whatever device the run used."""
    out = tmp_path / "run"
    run_train(download, out, "--epochs", "1", "--no-eval", "--device", "cuda")
    log = run_train(download, out, "--epochs", "2", "--no-eval", "--device", "cuda", "--resume")
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Detection and error bars
# ----------------------------------------------------------------------------------------------
def test_each_kind_of_faulty_pair_is_scored_against_clean_pairs_only():
    """Injected pairs found perfectly among clean ones, while natural faulty pairs score lower still:
    the natural ones are neither hits nor false alarms of the injected detector (and vice versa)."""
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0])
    injected = np.array([0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    natural = np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    report = evaluate.detection_report(s, injected, natural)
    assert report["injected"]["auc"] == 1.0 and report["injected"]["precision_at_n"] == 1.0
    assert report["natural"]["auc"] == 1.0 and report["injected"]["n_scored"] == 6
    assert report["injected"]["chance"] == pytest.approx(2 / 6)


def test_the_most_likely_faulty_pairs_count_both_kinds(capsys):
    top = [{"injected": True, "natural": False}] * 3 + [{"injected": False, "natural": True}] * 2 \
        + [{"injected": False, "natural": False}] * 5
    evaluate.print_table({"most_likely_faulty": top, "detection_injected": {"n_faulty": 3, "auc": 1, "precision_at_n": 1}})
    assert "of the 10 most likely faulty pairs: 3 injected, 2 natural (marked in annotations.csv), 5 clean" \
        in capsys.readouterr().out


def test_error_bars_are_the_standard_error_over_seeds():
    """Two seeds at 0.4 and 0.6: sample std (ddof 1) 0.1414 (not the population std 0.1), standard
    error 0.1414 / √2 = 0.1; three seeds 0.4, 0.5, 0.6: std 0.1, standard error 0.1 / √3."""
    mean, spread = plots.mean_and_spread(np.array([[0.4, 0.6], [0.5, 0.5]]))
    assert mean.tolist() == pytest.approx([0.5, 0.5]) and spread.tolist() == pytest.approx([0.1, 0.0])
    _, spread = plots.mean_and_spread(np.array([[0.4, 0.5, 0.6]]))
    assert spread.tolist() == pytest.approx([0.1 / 3 ** 0.5])


# ----------------------------------------------------------------------------------------------
# prepare: the download transcoded once to the training scale (tools/prepare.py)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prepared(download, tmp_path_factory):
    dst = tmp_path_factory.mktemp("prepared")
    prepare.main([str(download), str(dst), "--short-side", "24", "--keyframe-interval", "8", "--workers", "2"])
    return dst


def test_prepare_keeps_the_layout_and_names_what_it_cannot_read(download, prepared):
    """Every readable video comes back as <same path>.mp4 at the asked scale (short side, fps,
    keyframe interval, mono audio at the rate; no audio where the source had none); the metadata
    (CSVs, split lists) is copied as is; what FFmpeg cannot read is named with the scan's reason."""
    failed = dict(line.split("\t") for line in (prepared / prepare.FAILED_FILE).read_text().splitlines())
    reasons = {Path(p).name: r.split(":")[0] for p, r in failed.items()}
    assert reasons == {clip_name(14): "zero bytes", clip_name(15): "cannot open / corrupt",   # truncated
                       clip_name(24, ".part"): "cannot open / corrupt", "v_Archery_g04_c01.avi": "zero bytes"}
    for f in ("train.csv", "validate.csv", "ucfTrainTestlist/trainlist01.txt", "testTrainMulti_7030_splits/catch_test_split1.txt"):
        assert (prepared / f).read_bytes() == (download / f).read_bytes()
    assert not list(prepared.rglob(".DS_Store")) and not list(prepared.rglob(".*.tmp*"))
    made = sorted(prepared.rglob("*.mp4"))
    assert len(made) == len(prepare.plan(download, prepared)[0]) - len(failed) == 47
    for path in made:
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            assert min(v.codec_context.width, v.codec_context.height) <= 24 and v.codec_context.width % 2 == 0
            assert float(v.average_rate) == 16.0
            keyframes = [k for k, p in enumerate(c.demux(v)) if p.is_keyframe]
            assert keyframes[:2] == [0, 8] or len(keyframes) == 1
        with av.open(str(path)) as c:
            if c.streams.audio:
                a = c.streams.audio[0]
                assert (a.codec_context.sample_rate, a.codec_context.layout.name) == (24000, "mono")
    without_audio = {p.name for p in made if not av.open(str(p)).streams.audio}
    assert clip_name(4) in without_audio and "v_Archery_g01_c01.mp4" in without_audio


def test_training_and_evaluation_run_on_a_prepared_copy_unchanged(download, prepared, tmp_path, capsys):
    """train.py --data-root DST and evaluate.py with the original split files (which name .avi files:
    the listings find the prepared .mp4) see the same videos as on the download."""
    out = tmp_path / "run"
    run_train(prepared, out, "--epochs", "1", "--csv", str(prepared / "train.csv"), "--val-csv",
              str(prepared / "validate.csv"))
    said = capsys.readouterr().out
    # the same 16 videos as on the download; what prepare could not read is missing in the copy
    assert "16 videos (4 classes, 5 broken left out)" in said and "3  missing file" in said
    r = evaluate.main([str(out), *downstream_flags(prepared), "--clips", "2", "--ft-epochs", "1", "--workers", "0",
                       "--queries", "3"])
    assert (r["ucf"]["train_videos"], r["ucf"]["test_videos"], r["hmdb"]["train_videos"]) == (8, 3, 6)


def test_prepared_clips_keep_sound_and_picture_aligned(tmp_path):
    """A flash at 1.5 s with a click at the same moment, in a 30 fps file whose streams start at
    different times (0.5 s and 0.25 s): in the prepared copy the click is still where the flash is (within a frame at 16 fps)."""
    src = tmp_path / "src" / "flash.mkv"
    src.parent.mkdir()
    with av.open(str(src), "w") as out:
        vs = out.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = out.add_stream("pcm_s16le", rate=44100)
        aus.layout = "stereo"
        for i in range(90):  # video from 0.5 s to 3.5 s
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 250 if 45 <= i + 15 < 48 else 20, np.uint8), format="rgb24")
            f.pts, f.time_base = i + 15, Fraction(1, 30)
            out.mux(vs.encode(f))
        out.mux(vs.encode())
        wave = np.zeros((2, 3 * 44100), np.int16)  # audio from 0.25 s to 3.25 s; click at 1.5 s
        wave[:, int(1.25 * 44100):int(1.25 * 44100) + 200] = 20000
        af = av.AudioFrame.from_ndarray(wave.T.reshape(1, -1).copy(), format="s16", layout="stereo")
        af.sample_rate, af.pts, af.time_base = 44100, int(0.25 * 44100), Fraction(1, 44100)
        out.mux(aus.encode(af))
        out.mux(aus.encode())
    dst = tmp_path / "flash.mp4"
    prepare.transcode(src, dst)
    spec = data.ClipSpec(frames=16, fps=16.0, audio_seconds=1.0, sample_rate=16000)
    for path in (src, dst):
        frames, wave = data.decode_clip(path, 0.5, spec)  # clip times count from the first video frame
        flash = np.argmax(frames.mean(axis=(1, 2, 3))) / 16.0
        click = np.argmax(np.abs(wave)) / 16000
        assert abs(flash - 0.5) <= 1 / 16 + 1e-6 and abs(click - flash) <= 1 / 16 + 1e-6, (path, flash, click)


def test_a_stopped_prepare_continues_and_never_leaves_half_a_file(download, tmp_path, monkeypatch):
    """A file is written under a hidden temporary name and renamed when whole: a transcode that fails
    half-way leaves nothing behind; a second prepare transcodes only what is not done yet."""
    src = tmp_path / "src"
    shutil.copytree(download / "kinetics" / "train" / "zumba", src / "train" / "zumba")
    truncated = src / "train" / "zumba" / clip_name(30)
    truncated.write_bytes(truncated.read_bytes()[:-3000])  # readable header, data cut off
    with pytest.raises(Exception):
        prepare.transcode(truncated, tmp_path / "half.mp4")
    assert not list(tmp_path.glob("*half.mp4*"))
    dst = tmp_path / "dst"
    first = prepare.prepare(src, dst, workers=1, log=lambda *a: None)
    done = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")}
    victim = sorted(done)[-1]
    victim.unlink()                                     # as if prepare had been stopped before this file
    second = prepare.prepare(src, dst, workers=1, log=lambda *a: None)
    assert second["skipped"] == len(done) - 1 and second["prepared"] == 1 and victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in done.items() if p != victim)
    assert first["failed"] == second["failed"]          # the broken file is named again, each time


def test_prepare_refuses_to_continue_at_another_scale(download, prepared, capsys):
    """A destination records its scale: other flags would mix two scales in one tree."""
    with pytest.raises(SystemExit):
        prepare.main([str(download), str(prepared), "--short-side", "32"])
    assert "was prepared at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main([str(download / "nothing"), str(prepared)])
    assert "is not a folder" in capsys.readouterr().err


def test_the_parallel_scan_finds_what_the_sequential_one_finds(download):
    """listings.probe_all over processes gives the same (duration, reason) per file, in order."""
    paths = [str(p) for p in listings.video_files(download / "kinetics" / "train", recursive=True)]
    assert len(paths) >= 16
    assert listings.probe_all(paths, True, 1.0, quiet=True, workers=2) == listings.probe_all(paths, True, 1.0, quiet=True, workers=1)


def test_bench_compares_a_youtube_like_source_with_its_prepared_copy(tmp_path, capsys):
    """`python tools/bench_decoding.py` at small settings: writes the source (long GOP), prepares it, prints
    clips/s per core before and after and the loader's rate against raw decoding."""
    bench_decoding.main(["--youtube-like", str(tmp_path), "--files", "2", "--seconds", "2.5", "--resolution", "96x64",
               "--clips", "3", "--workers", "1"])
    said = capsys.readouterr().out
    assert re.search(r"source \(96x64, 30 fps, 2 files\)\s+\d", said) and "prepared / source, per core:" in said
    assert re.search(r"loader on the prepared copy, 1 worker\(s\):\s+\d+\.\d clips/s = \d+\.\d\d of raw", said)
    with av.open(str(next((tmp_path / "source").rglob("*.mp4")))) as c:
        assert [k for k, p in enumerate(c.demux(video=0)) if p.is_keyframe] == [0]  # one GOP: as YouTube's


def test_the_gpu_check_runs_its_steps_on_the_cpu_at_small_settings(tmp_path, capsys):
    """gpu_check.py --small: source -> prepare -> the levers one by one (FLOPs counted for each) ->
    xid and robust -> a run stopped after one epoch and resumed -> the λ sweep with 2 points at
    once; every target printed with ok or MISSED, each from its number (the timings are the CPU's)."""
    result = gpu_check.main(["--small", "--root", str(tmp_path), "--files", "8", "--workers", "1",
                             "--no-compile"])
    said = capsys.readouterr().out
    assert [name for name, _, _ in result["levers"]] == ["baseline", "cuDNN autotuning", "channels-last 3-D",
                                                          "fused Adam", "batch 128"]
    assert all(r["flops"] > 0 and r["clips_per_s"] > 0 for _, r, _ in result["levers"])
    assert set(result["step"]) == {"xid", "robust"} and result["epochs"] == [1, 2]
    assert set(result["times"]["robust"]) == {"data", "transforms", "forward", "loss", "backward", "bank"}
    ratio, worst = result["step"]["robust"] / result["step"]["xid"], max(result["wait"].values())
    assert [ok for _, ok in result["checks"]] == [result["clips_per_s"]["xid"] >= 1000, worst < 0.05,
                                                  ratio <= 1.10, True, result["figures_min"] <= 15]
    assert f"({ratio:.2f}x)" in said and f"(worst {worst:.1%})" in said and "kept: " in said
    assert said.count("ok    ") + said.count("MISSED") == 5 and "ok      the resumed run logged epochs [1, 2]" in said
    for lam in ("0", "0.25"):                                               # the parallel sweep's points
        assert "ucf" in json.loads((tmp_path / "sweep" / "lambda" / f"lam_{lam}_seed0" / "results.json").read_text())
    assert (tmp_path / "sweep_figure.png").exists() and "2 points in" in said


def _twice_but_die_on_3(x):
    if x == 3:
        os._exit(1)  # as a worker does when FFmpeg crashes on a file
    return 2 * x


def test_a_worker_that_dies_takes_only_its_own_file_with_it():
    """listings.in_processes (prepare's and the scan's pool): a dead worker does not end the run; the
    files it may have been on are retried one by one, and only the one that kills again is named."""
    got = dict(listings.in_processes(_twice_but_die_on_3, range(10), 2, crashed=lambda x: "crashed"))
    assert got == {**{x: 2 * x for x in range(10) if x != 3}, 3: "crashed"}


def test_prepare_follows_linked_folders_and_names_a_name_clash(download, tmp_path):
    """A class folder that is a symbolic link is prepared like any other; two containers of one name
    become one .mp4: the one listings.kinetics_csv reads (a video extension, then the last name), the
    other named."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere" / "linked class"
    (src / "train" / "a").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    good = download / "kinetics" / "train" / "abseiling"
    shutil.copy(good / clip_name(2, ".mkv"), src / "train" / "a" / "x.mkv")
    shutil.copy(good / clip_name(3, ".webm"), src / "train" / "a" / "x.webm")
    shutil.copy(good / clip_name(0), elsewhere / "y.mp4")
    (src / "train" / "b").symlink_to(elsewhere, target_is_directory=True)
    result = prepare.prepare(src, tmp_path / "dst", workers=1, log=lambda *a: None)
    assert (tmp_path / "dst" / "train" / "b" / "y.mp4").exists() and (tmp_path / "dst" / "train" / "a" / "x.mp4").exists()
    assert [(Path(p).name, r.split(",")[0]) for p, r in result["failed"]] == [("x.mkv", "same name as x.webm")]
    (src / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n")  # what kinetics_csv would read:
    assert listings.kinetics_csv.__doc__ and sorted(listings.video_files(src / "train" / "a"),  # the same file
                                                key=lambda f: (f.suffix.lower() in listings.VIDEO_EXTENSIONS, f.name))[-1].name == "x.webm"


def test_prepare_copies_a_leftover_that_sorts_before_every_video_of_its_folder(download, tmp_path):
    """A thumbnail or a .ytdl file sorting first in a class folder is not a video: prepare copies it
    as it is (so the scan of DST names it as the scan of SRC did) into a folder that no video has
    made yet, instead of stopping the whole prepare."""
    src = tmp_path / "src" / "train" / "a"
    src.mkdir(parents=True)
    (src / "0000.jpg").write_bytes(b"\xff\xd8 not a video")
    (src / "0000.mp4.ytdl").write_text("{}")
    shutil.copy(download / "kinetics" / "train" / "abseiling" / clip_name(0), src / "x.mp4")
    result = prepare.prepare(tmp_path / "src", tmp_path / "dst", workers=1, log=lambda *a: None)
    dst = tmp_path / "dst" / "train" / "a"
    assert (dst / "0000.jpg").read_bytes() == (src / "0000.jpg").read_bytes()
    assert (dst / "0000.mp4.ytdl").exists() and (dst / "x.mp4").exists()
    assert sorted(Path(p).name for p, r in result["failed"] if "copied as it is" in r) == [
        "0000.jpg", "0000.mp4.ytdl"]


def test_a_failed_prepare_releases_its_lock_and_spares_other_programs_temporary_files(
        download, tmp_path, monkeypatch):
    """prepare's lock is released however it ends (an error included: the next prepare in the same
    process must not be told another one is writing), and its clean-up of files left by a killed
    prepare deletes only its own temporary files, not another program's (a scan cache being
    written beside the data)."""
    src = tmp_path / "src" / "train" / "a"
    src.mkdir(parents=True)
    shutil.copy(download / "kinetics" / "train" / "abseiling" / clip_name(0), src / "x.mp4")
    dst = tmp_path / "dst"
    monkeypatch.setattr(prepare, "plan", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full") as failed:  # kept: its traceback would
        prepare.prepare(tmp_path / "src", dst, workers=1, log=lambda *a: None)  # keep an open lock
    monkeypatch.undo()
    (dst / "train" / "a").mkdir(parents=True)
    others = dst / "train" / ".scan-cache-train.json.tmp4242"           # runs.atomic_write, as listings.scan calls it
    own = dst / "train" / "a" / f".x.mp4{prepare.TMP_MARK}4242"         # a killed prepare's
    others.write_text("{}")
    own.write_bytes(b"half")
    prepare.prepare(tmp_path / "src", dst, workers=1, log=lambda *a: None)  # not "another prepare"
    assert failed.value is not None and others.exists() and not own.exists() and (dst / "train" / "a" / "x.mp4").exists()


def _flash_and_click(path, audio_parts, flash_at, fps=30, seconds=4.0):
    """A 64x48 video (0..seconds) with one white frame at flash_at, and PCM audio written as
    (start, length, click_at) parts: a gap between parts is a gap in the file's timestamps."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = out.add_stream("pcm_s16le", rate=44100)
        aus.layout = "mono"
        for i in range(int(seconds * fps)):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 250 if i == round(flash_at * fps) else 20, np.uint8),
                                           format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(f))
        out.mux(vs.encode())
        for start, length, click in audio_parts:
            wave = np.zeros((1, int(length * 44100)), np.int16)
            if click is not None:
                wave[:, int((click - start) * 44100):int((click - start) * 44100) + 200] = 20000
            af = av.AudioFrame.from_ndarray(wave, format="s16", layout="mono")
            af.sample_rate, af.pts, af.time_base = 44100, int(start * 44100), Fraction(1, 44100)
            out.mux(aus.encode(af))
        out.mux(aus.encode())


def test_a_gap_in_the_source_audio_stays_a_gap(tmp_path):
    """Audio from 0-1 s and again from 2 s (nothing in between), a click at 2.5 s with the flash: the
    prepared copy fills the gap with silence, so the click stays at 2.5 s, with the flash."""
    src = tmp_path / "gap.mkv"
    _flash_and_click(src, [(0.0, 1.0, None), (2.0, 2.0, 2.5)], flash_at=2.5)
    dst = tmp_path / "gap.mp4"
    prepare.transcode(src, dst)
    frames, wave = data.decode_clip(dst, 2.0, data.ClipSpec(frames=16, fps=16.0, audio_seconds=1.0, sample_rate=16000))
    flash, click = np.argmax(frames.mean(axis=(1, 2, 3))) / 16.0, np.argmax(np.abs(wave)) / 16000
    assert abs(flash - 0.5) <= 1 / 16 + 1e-6 and abs(click - 0.5) <= 0.02, (flash, click)


def test_a_file_cut_off_mid_data_is_not_prepared_as_a_shorter_one(tmp_path):
    """A Matroska download cut off at 60% still opens and decodes to its end: transcode compares the
    last frame with the duration the file declares and refuses it."""
    src = tmp_path / "cut.mkv"
    write_av(src, fmt="matroska", seconds=4.0, fps=25, size=(64, 48))
    src.write_bytes(src.read_bytes()[: int(src.stat().st_size * 0.6)])
    with pytest.raises(RuntimeError, match="truncated"):
        prepare.transcode(src, tmp_path / "cut.mp4")
    assert not list(tmp_path.glob("*cut.mp4*"))


@pytest.mark.parametrize("size", [(64, 48), (256, 192)])
def test_both_ways_of_cropping_give_the_box_resized(tmp_path, size):
    """_decode_frames crops a prepared-size frame and resizes the box (torchvision), and scales a
    large frame while converting it (FFmpeg) so the box lands on the clip size: both give the box
    of the full frame, resized (compared with a crop-and-resize of the plain decoded frame)."""
    w, h = size
    path = tmp_path / "gradient.mp4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=8)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.options = {"qp": "0"}
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([255 * xx / w, 255 * yy / h, np.full_like(xx, 128.0)], -1).astype(np.uint8)
        for i in range(16):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 8)
            out.mux(vs.encode(f))
        out.mux(vs.encode())
    box = (h // 8, w // 4, h // 2, h // 2)  # top, left, height, width
    with av.open(str(path)) as c:
        full = data._decode_frames(c, 0.5, 4, 8.0)
    with av.open(str(path)) as c:
        got = data._decode_frames(c, 0.5, 4, 8.0, box=lambda *_: box, size=32)
    top, left, bh, bw = box
    ref = v2.functional.resize(torch.from_numpy(full[:, top:top + bh, left:left + bw]).permute(0, 3, 1, 2), [32, 32],
                               antialias=True).permute(0, 2, 3, 1).numpy()
    assert got.shape == (4, 32, 32, 3) and np.abs(got.astype(float) - ref).mean() < 4
