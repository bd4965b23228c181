"""data -> train -> evaluate -> plots, end to end, on tiny data the tests write themselves."""
import argparse
import csv
import fractions
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import data
import embedded_dataset
import evaluate
import listings
import losses
import model
import plots
import runs
import train
from data import ClipSpec, Video

TINY = dict(seed=0, per_class=5, downstream_per_class=6, faulty_share=0.2, size=32, fps=8, seconds=2.0,
            rate=16000)
SPEC = ClipSpec(frames=4, fps=4.0, size=24, audio_seconds=1.0, sample_rate=16000, n_mels=32)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """A tiny embedded dataset (10 classes x 5 clips + downstream sets), made once per test run."""
    return embedded_dataset.make(tmp_path_factory.mktemp("embedded"), log=lambda *a: None, **TINY)


def write_av(path, fmt=None, vcodec="libx264", acodec="aac", size=(32, 32), fps=8, seconds=2.0, rate=16000,
             layout="mono", pix_fmt="yuv420p", offset=0.0):
    """A small video file with any container/codecs, streams starting at `offset` seconds."""
    with av.open(str(path), "w", format=fmt) as out:
        vs = aus = None  # both streams exist before the first packet is written
        if vcodec:
            vs = out.add_stream(vcodec, rate=fps)
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], pix_fmt
        if acodec:
            aus = out.add_stream(acodec, rate=rate)
            aus.layout = layout
        if vs:
            for i in range(int(seconds * fps)):
                f = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 10 * i % 255, np.uint8), format="rgb24")
                f.pts, f.time_base = i + int(offset * fps), fractions.Fraction(1, fps)
                out.mux(vs.encode(f))
            out.mux(vs.encode())
        if aus:
            fmt_name, channels = aus.codec_context.format.name, 2 if layout == "stereo" else 1
            wave = 0.1 * np.random.default_rng(0).standard_normal((channels, int(seconds * rate)))
            dtype = {"s16": np.int16, "s32": np.int32, "flt": np.float32, "fltp": np.float32,
                     "s16p": np.int16, "s32p": np.int32}[fmt_name]
            if dtype != np.float32:
                wave = wave * np.iinfo(dtype).max
            wave = wave.astype(dtype) if fmt_name.endswith("p") else wave.T.reshape(1, -1).astype(dtype)
            af = av.AudioFrame.from_ndarray(wave, format=fmt_name, layout=layout)
            af.sample_rate, af.pts, af.time_base = rate, int(offset * rate), fractions.Fraction(1, rate)
            out.mux(aus.encode(af))
            out.mux(aus.encode())
    return str(path)


# ----------------------------------------------------------------------------------------------
# The embedded dataset
# ----------------------------------------------------------------------------------------------
def test_the_embedded_dataset_is_deterministic(embedded, tmp_path):
    """Same seed, same decoded frames and audio (a second generation, compared clip by clip)."""
    again = embedded_dataset.make(tmp_path / "again", log=lambda *a: None, **TINY)
    for rel in ["kinetics/train/circle_horizontal/emb000000_000000_000002.mp4",
                "ucf/videos/SquareVertical/v_SquareVertical_g01_c01.mp4"]:
        a = data.decode_clip(embedded / rel, 0.25, SPEC)
        b = data.decode_clip(again / rel, 0.25, SPEC)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert json.loads((embedded / "events.json").read_text()) == json.loads((again / "events.json").read_text())


def test_the_embedded_dataset_written_in_two_parts_is_the_same_data(embedded, tmp_path):
    """train.py writes only the pre-training set (ensure(downstream=False)); evaluate.py adds the
    stand-ins later, drawn on from the generator's state saved in embedded.json: the same files
    as one call, byte for byte, and the same events.json; a second part cut short is written
    again, and a complete set from before the parts were recorded is used as it is."""
    staged = tmp_path / "staged"
    embedded_dataset.make(staged, log=lambda *a: None, downstream=False, **TINY)
    made = json.loads((staged / "embedded.json").read_text())
    assert made["parts"] == ["kinetics"] and not made["complete"] and not (staged / "ucf").exists()
    assert embedded_dataset.ensure(staged, downstream=False, log=lambda *a: None) == staged
    assert not (staged / "ucf").exists()                             # train.py's call adds nothing
    (staged / "ucf" / "videos").mkdir(parents=True)                  # a second part cut short
    (staged / "ucf" / "videos" / "half_written.mp4").write_bytes(b"\0" * 10)
    said = []
    embedded_dataset.ensure(staged, log=said.append)                # evaluate.py's adds the rest
    assert "downstream stand-ins" in said[0]
    assert not (staged / "ucf" / "videos" / "half_written.mp4").exists()
    assert json.loads((staged / "embedded.json").read_text())["complete"] is True
    for rel in ["kinetics/train/circle_horizontal/emb000000_000000_000002.mp4",
                "ucf/videos/SquareVertical/v_SquareVertical_g01_c01.mp4",
                "hmdb/videos/ring_fast/ring_fast_005.mp4", "hmdb/testTrainMulti_7030_splits/ring_fast_test_split1.txt"]:
        assert (staged / rel).read_bytes() == (embedded / rel).read_bytes(), rel
    assert json.loads((staged / "events.json").read_text()) == json.loads((embedded / "events.json").read_text())
    # a dataset written in one part before parts were recorded is complete as it stands
    (staged / "embedded.json").write_text(json.dumps({"version": embedded_dataset.VERSION, "complete": True}))
    said.clear()
    assert embedded_dataset.ensure(staged, log=said.append) == staged and said == []


def test_remaking_the_embedded_dataset_leaves_nothing_stale_and_spares_other_folders(tmp_path):
    """An older embedded set is replaced whole (old class folders would become extra classes); a
    non-empty folder that is not an embedded set is refused, never emptied."""
    old = tmp_path / "embedded"
    (old / "kinetics" / "train" / "old_class").mkdir(parents=True)
    (old / "kinetics" / "train" / "old_class" / "x.mp4").write_bytes(b"old")
    (old / "embedded.json").write_text(json.dumps({"version": 0}))
    small = dict(TINY, per_class=2, downstream_per_class=2)
    embedded_dataset.make(old, log=lambda *a: None, **small)
    assert not (old / "kinetics" / "train" / "old_class").exists()
    assert json.loads((old / "embedded.json").read_text())["complete"] is True
    other = tmp_path / "mine"
    (other / "kinetics").mkdir(parents=True)
    (other / "kinetics" / "keep.mp4").write_bytes(b"user data")
    with pytest.raises(ValueError, match="not empty and holds no embedded.json"):
        embedded_dataset.make(other, log=lambda *a: None, **small)
    assert (other / "kinetics" / "keep.mp4").read_bytes() == b"user data"


def test_embedded_layout_and_split_files_parse(embedded):
    """Kinetics folder layout and official CSV agree; UCF101 / HMDB51 split files parse (3 folds)."""
    splits = embedded_dataset.splits(embedded)
    train, classes = splits["kinetics"]("train")
    assert len(classes) == 10 and len(train) == 10 * 4          # 80% of 5 per class
    via_csv, csv_classes = listings.kinetics_csv(embedded / "kinetics" / "kinetics_embedded.csv", embedded / "kinetics", "train")
    assert via_csv == train and csv_classes == classes
    ids = [r["youtube_id"] for r in csv.DictReader(open(embedded / "kinetics" / "kinetics_embedded.csv"))]
    assert len(ids) == len(set(ids)) == 10 * 5
    assert [v.path for v in train] == sorted(v.path for v in train)
    for name, n_classes in [("ucf", 18), ("hmdb", 12)]:
        for fold in (1, 2, 3):
            tr, c = splits[name]("train", fold)
            te, _ = splits[name]("test", fold)
            assert len(c) == n_classes and len(tr) + len(te) == n_classes * 6
            assert not {v.path for v in tr} & {v.path for v in te}
            assert all(Path(v.path).exists() for v in tr + te)
            assert {v.label for v in te} == set(range(n_classes))


def test_natural_faulty_positives_are_marked(embedded):
    """annotations.csv marks the clips whose audio is unrelated to the picture."""
    rows = list(csv.DictReader(open(embedded / "kinetics" / "annotations.csv")))
    faulty = [r for r in rows if r["faulty_positive"] == "1"]
    assert 0 < len(faulty) < len(rows) and all(r["audio"] in ("music", "voice-over") for r in faulty)
    assert all((embedded / r["path"]).exists() for r in rows)


def test_clips_have_documented_shapes(embedded):
    """Loader items: video uint8 (3, T, H, W), waveform (1, S); eval: n clips of each. BatchTransforms
    turns a batch into the model's inputs: float video, log-mel (1, F, S) at 100 frames/s."""
    videos, _ = listings.scan(embedded_dataset.splits(embedded)["kinetics"]("train")[0][:3], SPEC, log=lambda *a: None)
    item = data.AVClips(videos, SPEC, train=True)[1]
    assert item["video"].shape == (3, 4, 24, 24) and item["video"].dtype == torch.uint8
    assert item["jitter"].shape == (3,) and ((0.6 <= item["jitter"]) & (item["jitter"] <= 1.4)).all()
    assert item["audio"].shape == (1, 16000) and item["audio"].dtype == torch.float32
    assert item["index"] == 1 and item["label"] == videos[1].label and item["faulty"] is False
    item = data.AVClips(videos, SPEC, train=False, num_clips=5)[0]
    assert item["video"].shape == (5, 3, 4, 24, 24) and item["audio"].shape == (5, 1, 16000)
    batch = data.collate_clips([data.AVClips(videos, SPEC, train=True)[i] for i in range(3)])
    tf = data.BatchTransforms(SPEC, train=True)
    video, audio = tf.video(batch["video"], batch["jitter"]), tf.audio(batch["audio"])
    assert video.shape == (3, 3, 4, 24, 24) and video.dtype == torch.float32 and audio.shape == (3, 1, 32, 101)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()


def test_batch_transforms_jitter_each_clip_with_its_factors_and_normalise():
    """Colour jitter applies every clip's own (brightness, contrast, saturation) factors in one
    call, as torchvision's functional ops do clip by clip; evaluation only normalises,
    (x / 255 - 0.45) / 0.225."""
    from torchvision.transforms.v2 import functional as TF
    clips = torch.randint(0, 256, (4, 3, 4, 8, 8), dtype=torch.uint8)
    factors = torch.tensor([[1.0, 1.0, 1.0], [1.3, 0.7, 1.2], [0.6, 1.4, 0.6], [1.1, 0.9, 1.4]])
    out = data.colour_jitter(clips.float() / 255, factors)
    for clip, (b, c, s), got in zip(clips, factors.tolist(), out):
        frames = clip.float().transpose(0, 1) / 255                      # (T, 3, H, W) for torchvision
        want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(frames, b), c), s)
        torch.testing.assert_close(got.transpose(0, 1), want, atol=1e-5, rtol=0,
                                   msg=f"clip with factors {(b, c, s)}")
    tf = data.BatchTransforms(SPEC, train=True)
    torch.testing.assert_close(tf.video(clips, factors), (out - 0.45) / 0.225)
    with pytest.raises(ValueError, match="jitter"):  # a training batch without its factors
        tf.video(clips)
    expected = (clips.float() / 255 - 0.45) / 0.225
    torch.testing.assert_close(data.BatchTransforms(SPEC, train=False).video(clips), expected)


def test_the_log_mel_is_torchaudios_mel_spectrogram():
    """data.MelPower takes |STFT|² as re² + im² (no square root): the same spectrogram as torchaudio's
    MelSpectrogram with AVID's 40-ms window and 10-ms hop, to float rounding."""
    import torchaudio
    wave = torch.randn(3, 1, 24000, generator=torch.Generator().manual_seed(0))
    for rate, n_mels in ((16000, 40), (24000, 64)):
        ours = data.mel_spectrogram(rate, n_mels)(wave[..., :rate])
        ref = torchaudio.transforms.MelSpectrogram(rate, n_fft=rate // 25, hop_length=rate // 100,
                                                   n_mels=n_mels)(wave[..., :rate])
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_clip_is_fixed_by_seed_epoch_and_index_in_any_worker(embedded):
    """AVClips[(epoch, i)] draws start, crop, flip, volume and jitter from (seed, epoch, i): the
    same key gives the same clip, another epoch another clip, and a loader gives the same batches
    with 0 or 2 persistent workers, epoch after epoch (what makes a resumed run the same run)."""
    videos, _ = listings.scan(embedded_dataset.splits(embedded)["kinetics"]("train")[0][:12], SPEC,
                          log=lambda *a: None)
    ds = data.AVClips(videos, SPEC, train=True, seed=3)
    a, b, other = ds[(2, 5)], ds[(2, 5)], ds[(3, 5)]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["jitter"], b["jitter"])
    assert torch.equal(a["audio"], b["audio"])
    assert not torch.equal(a["video"], other["video"]) and not torch.equal(a["jitter"], other["jitter"])
    assert not torch.equal(a["jitter"], data.AVClips(videos, SPEC, train=True, seed=4)[(2, 5)]["jitter"])

    def epochs(workers):
        sampler = data.EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers,
                                             collate_fn=data.collate_clips,
                                             persistent_workers=workers > 0)
        seen = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            seen += [(bt["index"], bt["video"], bt["audio"], bt["jitter"]) for bt in loader]
        return seen

    without, with_workers = epochs(0), epochs(2)
    assert len(without) == len(with_workers) == 6                       # 3 batches, 2 epochs
    for x, y in zip(without, with_workers):
        for u, w in zip(x, y):
            assert torch.equal(u, w)


def test_crop_by_ffmpeg_matches_crop_then_resize(embedded):
    """decode_clip(box=...) lets FFmpeg scale while converting to RGB; it gives what cropping the
    stored frames and resizing them (torchvision, antialiased) gives, up to interpolation: far
    closer than the same crop taken 3 pixels off."""
    rel = "kinetics/train/circle_horizontal/emb000002_000000_000002.mp4"
    full, _ = data.decode_clip(embedded / rel, 0.5, SPEC)                       # (T, 32, 32, 3) as stored

    def distance(frames, box):                                             # mean |difference|, of 255 levels
        top, left, h, w = box
        x = torch.from_numpy(full[:, top:top + h, left:left + w]).permute(0, 3, 1, 2).float()
        ref = v2.functional.resize(x, [24, 24], antialias=True).permute(0, 2, 3, 1)
        return (torch.from_numpy(frames).float() - ref).abs().mean().item()

    for box, off in [((4, 6, 20, 16), (7, 9, 20, 16)), ((10, 3, 13, 27), (13, 5, 13, 27)),
                     ((2, 2, 28, 28), (0, 0, 28, 28)), ((0, 0, 32, 32), None)]:
        small, _ = data.decode_clip(embedded / rel, 0.5, SPEC, box=lambda h, w: box)
        assert small.shape == (4, 24, 24, 3)
        assert distance(small, box) < 10
        if off:
            assert distance(small, box) < distance(small, off) / 3


def test_audio_events_line_up_with_visual_events(embedded):
    """The instance detail shared by both streams: a click in the audio when the shape hits a wall."""
    rows = csv.DictReader(open(embedded / "kinetics" / "annotations.csv"))
    rel = next(r["path"] for r in rows if r["audio"] == "events" and r["split"] == "train")
    all_events = json.loads((embedded / "events.json").read_text())
    assert all(0 < e < TINY["seconds"] for evs in all_events.values() for e in evs)
    events = all_events[rel]
    assert events
    spec = ClipSpec(frames=16, fps=8.0, audio_seconds=2.0)
    frames, wave = data.decode_clip(embedded / rel, 0.0, spec)
    x = [np.nonzero(np.abs(f.astype(float) - np.median(f.reshape(-1, 3), 0)).sum(2) > 100)[1].mean() for f in frames]
    step = np.sign(np.diff(x))
    reversals = (np.nonzero(step[1:] != step[:-1])[0] + 1) / 8.0              # frame times of wall hits
    env = np.abs(wave).reshape(-1, 80).max(1)                                  # 5 ms bins
    onsets = (np.nonzero((env[1:] > 0.15) & (env[:-1] <= 0.15))[0] + 1) * 0.005
    for e in events:
        assert np.min(np.abs(onsets - e)) < 0.01                               # audio: within 10 ms
        if 0.2 < e < 1.8:
            assert np.min(np.abs(reversals - e)) <= 1 / 8 + 1e-6               # video: within a frame


def test_the_recording_cue_ties_a_rooms_brightness_to_its_hum():
    """With hum > 0 a clip's background brightness (20 + 70·room at the left edge) comes with a
    mains hum at 60 + 180·room Hz in its audio: a cue shared by both streams that says nothing of
    the class. Dubbed audio (music, voice-over) carries another room's hum."""
    def room_and_hum(kind, seed):
        frames, wave, _ = embedded_dataset._render_clip(
            np.random.default_rng(seed), "circle", "red", "vertical", (35.0, 80.0), 440, "sine", kind,
            64, 16, 2.0, 16000, hum=0.05)
        # the left column, away from the shape (vertical motion at a random x; take the darker side)
        edge = min(np.median(frames[:, :, 0]), np.median(frames[:, :, 1]))
        spectrum = np.abs(np.fft.rfft(wave))[: 2 * 260]                          # 0.5-Hz bins up to 260 Hz
        return (edge - 20) / 70, (np.argmax(spectrum[2 * 40:]) + 2 * 40) / 2.0
    for seed in range(4):
        room, hum = room_and_hum("events", seed)
        assert abs(hum - (60 + 180 * room)) < 8, (seed, room, hum)              # the room's own hum
    dubbed = [room_and_hum("music", seed) for seed in range(4)]
    assert max(abs(hum - (60 + 180 * room)) for room, hum in dubbed) > 20       # another room's


# ----------------------------------------------------------------------------------------------
# Faulty-positive injection (n₀)
# ----------------------------------------------------------------------------------------------
def test_injection_exact_count_no_self_pairs_seeded():
    """n₀·N instances get another instance's audio, never their own; the same seed, the same pairs."""
    src, pairs = data.inject_faulty_positives(1000, 0.3, seed=4)
    assert len(pairs) == 300 and (src != torch.arange(1000)).sum() == 300
    assert all(i != j for i, j in pairs) and all(src[i] == j for i, j in pairs)
    assert data.inject_faulty_positives(1000, 0.3, seed=4)[1] == pairs
    assert data.inject_faulty_positives(1000, 0.3, seed=5)[1] != pairs
    assert data.inject_faulty_positives(10, 0.0)[1] == []
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="n0"):
            data.inject_faulty_positives(10, bad)


def test_injected_item_carries_the_donor_audio(embedded):
    """An injected instance keeps its own video and gets its donor's audio, and says so."""
    videos, _ = listings.scan(embedded_dataset.splits(embedded)["kinetics"]("val")[0][:4], SPEC, log=lambda *a: None)
    src = torch.tensor([2, 1, 2, 3])
    own = data.AVClips(videos, SPEC, train=False, num_clips=1)
    swapped = data.AVClips(videos, SPEC, train=False, num_clips=1, audio_source=src)
    assert swapped[0]["faulty"] and not swapped[1]["faulty"]
    assert torch.equal(swapped[0]["video"], own[0]["video"])
    assert torch.equal(swapped[0]["audio"], own[2]["audio"])


def test_subset_class_list_and_balance(embedded):
    """--classes keeps the named classes, relabelled 0..C-1 in sorted name order; --subset draws a
    class-balanced, seeded subset."""
    videos, classes = embedded_dataset.splits(embedded)["kinetics"]("train")
    sub, sub_classes = listings.keep_classes(videos, classes, ["square_vertical", "circle_horizontal"])
    assert sub_classes == ["circle_horizontal", "square_vertical"] and len(sub) == 8
    named = {v.path: classes[v.label] for v in videos if classes[v.label] in sub_classes}
    assert {v.path: sub_classes[v.label] for v in sub} == named
    assert [v.label for v in sub].count(0) == 4
    sub = listings.balanced_subset(videos, len(classes), 20, seed=1)
    counts = np.bincount([v.label for v in sub], minlength=10)
    assert len(sub) == 20 and counts.max() - counts.min() <= 1
    assert sub == listings.balanced_subset(videos, len(classes), 20, seed=1)
    with pytest.raises(ValueError, match="--classes"):
        listings.keep_classes(videos, classes, ["no_such_class"])


# ----------------------------------------------------------------------------------------------
# Broken and unusual files
# ----------------------------------------------------------------------------------------------
def test_scan_names_every_broken_file(embedded, tmp_path):
    """Each kind of broken file gets its own reason; the cache is used and invalidated by a change."""
    good = embedded / "kinetics/train/circle_horizontal/emb000000_000000_000002.mp4"
    files = {
        "zero.mp4": lambda p: p.write_bytes(b""),
        "truncated.mp4": lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 3]),
        "text.mp4": lambda p: p.write_text("this is not a video\n"),
        "no_audio.mp4": lambda p: write_av(p, acodec=None),
        "no_video.mp4": lambda p: write_av(p, vcodec=None),
        "short.mp4": lambda p: write_av(p, seconds=0.5),
    }
    for name, make in files.items():
        make(tmp_path / name)
    videos = [Video(str(tmp_path / n)) for n in sorted(files)] + [Video(str(good)), Video(str(tmp_path / "gone.mp4"))]
    lines = []
    usable, broken = listings.scan(videos, SPEC, tmp_path / "cache.json", log=lines.append)
    reasons = {Path(p).name: r for p, r in broken}
    assert [v.path for v in usable] == [str(good)]
    assert reasons["zero.mp4"] == "zero bytes"
    assert reasons["truncated.mp4"].startswith("cannot open / corrupt")
    assert reasons["text.mp4"].startswith("cannot open / corrupt")
    assert reasons["no_audio.mp4"] == "no audio stream"
    assert reasons["no_video.mp4"] == "no video stream"
    assert reasons["short.mp4"].startswith("too short")
    assert reasons["gone.mp4"] == "missing file"
    assert "1 usable, 7 broken" in lines[0]
    # without audio required, the video-only file is usable
    assert any(v.path.endswith("no_audio.mp4") for v in listings.scan(videos, ClipSpec(need_audio=False, frames=4, fps=4.0),
                                                                 log=lambda *a: None)[0])
    # the cache is used, and invalidated when a file changes
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert cache[str(tmp_path / "zero.mp4")]["reason"] == "zero bytes"
    write_av(tmp_path / "zero.mp4")
    usable, _ = listings.scan(videos, SPEC, tmp_path / "cache.json", log=lambda *a: None)
    assert str(tmp_path / "zero.mp4") in [v.path for v in usable]


def test_no_usable_file_is_a_clear_error(tmp_path):
    """A scan that keeps nothing stops with the dataset's name instead of training on nothing."""
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no usable video in mydata"):
        listings.scan([Video(str(tmp_path / "a.mp4"))], SPEC, name="mydata", log=lambda *a: None)


@pytest.mark.parametrize("name, kwargs", [
    ("mpeg4_mp3.avi", dict(fmt="avi", vcodec="mpeg4", acodec="libmp3lame", rate=44100, layout="stereo")),
    ("vp9_opus.webm", dict(fmt="webm", vcodec="libvpx-vp9", acodec="libopus", rate=48000, layout="stereo")),
    ("mjpeg_pcm.mkv", dict(fmt="matroska", vcodec="mjpeg", acodec="pcm_s16le", pix_fmt="yuvj420p", size=(51, 37))),
    ("odd_size_22k.mp4", dict(vcodec="mpeg4", size=(50, 38), rate=22050)),
    ("starts_late.mp4", dict(offset=1.5)),
    ("low_fps.mp4", dict(fps=2)),
])
def test_unusual_but_valid_files_work(tmp_path, name, kwargs):
    """Other containers and codecs, any rate and channel count, odd sizes, a late start, low fps."""
    path = write_av(tmp_path / name, **kwargs)
    usable, broken = listings.scan([Video(path)], SPEC, log=lambda *a: None)
    assert not broken and usable[0].duration >= 1.9
    item = data.AVClips(usable, SPEC, train=True)[0]
    assert "error" not in item
    assert item["video"].shape == (3, 4, 24, 24) and item["audio"].shape == (1, 16000)
    assert item["audio"].std() > 0.02     # noise of std 0.1 (~0.07 mixed down to mono), not silent padding


def test_low_fps_repeats_frames(tmp_path):
    """A 2 fps file read at 4 fps shows each frame twice (the last frame shown at each time)."""
    path = write_av(tmp_path / "slow.mp4", fps=2, seconds=3.0, vcodec="mjpeg", pix_fmt="yuvj420p", fmt="matroska")
    frames, _ = data.decode_clip(path, 0.0, SPEC)
    means = frames.reshape(4, -1).mean(1)
    assert abs(means[0] - means[1]) < 2 and abs(means[2] - means[3]) < 2 and abs(means[1] - means[2]) > 5


def test_file_failing_after_scan_is_reported_not_replaced(embedded, tmp_path):
    """A clip that breaks while loading comes back named in batch["errors"]; no other instance takes
    its place (its bank slot would be corrupted)."""
    videos, _ = listings.scan(embedded_dataset.splits(embedded)["kinetics"]("val")[0][:3], SPEC, log=lambda *a: None)
    broken = tmp_path / "was_fine.mp4"
    broken.write_bytes(Path(videos[1].path).read_bytes())
    videos[1] = Video(str(broken), videos[1].label, videos[1].duration)
    broken.write_bytes(b"\x00" * 100)                                   # corrupted after the scan
    ds = data.AVClips(videos, SPEC, train=True)
    batch = data.collate_clips([ds[i] for i in range(3)])
    assert batch["index"].tolist() == [0, 2] and batch["video"].shape[0] == 2
    assert len(batch["errors"]) == 1 and "was_fine.mp4" in batch["errors"][0]


# ----------------------------------------------------------------------------------------------
# train.py: every loss mode end to end, resume, two processes, argument errors
# ----------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--frames", "4", "--fps", "4", "--crop", "16", "--n-mels", "32", "--batch-size", "8",
               "--num-negatives", "16", "--workers", "0", "--warmup-epochs", "1", "--no-eval"]


def run_train(embedded, out, *flags):
    train.main(["--embedded-root", str(embedded), "--out", str(out), *TRAIN_FLAGS, *flags])
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def epochs_of(log):
    return [r for r in log if r["kind"] == "epoch"]


@pytest.mark.parametrize("mode", ["xid", "weighted", "soft", "robust"])
def test_train_every_mode_end_to_end(embedded, tmp_path, mode):
    """Two epochs (the first a warm-up) with injected faulty positives: finite losses, a checkpoint
    that holds banks and injection, and the epoch log a user reads."""
    log = epochs_of(run_train(embedded, tmp_path / mode, "--mode", mode, "--epochs", "2", "--n0", "0.25"))
    assert len(log) == 2 and log[0]["warmup"] and not log[1]["warmup"]
    for r in log:
        assert np.isfinite(r["loss"]) and r["data_errors"] == 0 and 0 <= r["data_wait_fraction"] <= 1
        assert "injected_auc" in r and "w_mean" in r and "mu" in r
        assert np.isfinite(r["loss_clean_pairs"]) and "clean_rows" not in r  # the clean pairs' own loss
    if mode in ("weighted", "robust"):
        assert log[1]["batch_mean_weight"] < 1.0
    else:
        assert log[1]["batch_mean_weight"] == 1.0
    if mode in ("soft", "robust"):
        assert log[1]["target_on_positive"] < 1.0 and "soft_mass_same_class" in log[1]
    ckpt = torch.load(tmp_path / mode / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["num_instances"] == 40
    assert ckpt["criterion"]["bank.v_bar"].shape == (40, 128)
    injection = json.loads((tmp_path / mode / "injection.json").read_text())
    assert len(injection["pairs"]) == 10 and [p["instance"] for p in injection["pairs"]] == [i for i, _ in ckpt["injected_pairs"]]


@pytest.mark.parametrize("refresh,workers", [("step", "0"), ("epoch", "2")])
def test_resume_gives_the_same_run(embedded, tmp_path, refresh, workers):
    """Stopped after epoch 1 and resumed, a run ends with the same losses as one that never stopped
    (with either bank refresh, with or without persistent loader workers, whose clips follow from
    (seed, epoch, index)); resuming with the other refresh is refused."""
    flags = ["--n0", "0.2", "--bank-refresh", refresh, "--workers", workers]
    full = epochs_of(run_train(embedded, tmp_path / "full", "--epochs", "3", *flags))
    run_train(embedded, tmp_path / "parts", "--epochs", "1", *flags)
    other = "epoch" if refresh == "step" else "step"
    with pytest.raises(SystemExit):
        run_train(embedded, tmp_path / "parts", "--epochs", "3", "--n0", "0.2", "--bank-refresh", other, "--resume")
    parts = epochs_of(run_train(embedded, tmp_path / "parts", "--epochs", "3", *flags, "--resume"))
    assert [r["epoch"] for r in parts] == [1, 2, 3]
    for a, b in zip(full, parts):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["mu"] == pytest.approx(b["mu"], rel=1e-6)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["criterion"]
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["criterion"]
    torch.testing.assert_close(a["bank.v_bar"], b["bank.v_bar"])


@pytest.mark.parametrize("stop_in", [1, 2])
def test_ctrl_c_stops_with_a_note_and_the_run_resumes(embedded, tmp_path, monkeypatch, capsys, stop_in):
    """Ctrl-C exits with 130 and says what the checkpoint holds and how to go on, not a traceback:
    stopped in epoch 2, --resume finishes the run with every epoch logged once; stopped in epoch 1,
    there is nothing to resume and the same command starts over."""
    real = train.train_one_epoch

    def interrupted(run, args, epoch):
        if epoch == stop_in - 1:
            raise KeyboardInterrupt
        return real(run, args, epoch)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    try:
        run_train(embedded, tmp_path / "run", "--epochs", "3")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train.main as a traceback")
    except SystemExit as stop:
        assert stop.code == 130
    else:
        pytest.fail("the interrupted run did not stop")
    said = capsys.readouterr().out
    monkeypatch.setattr(train, "train_one_epoch", real)
    if stop_in == 2:
        assert "stopped (Ctrl-C) in epoch 2: epoch 1 is in" in said and "--resume continues" in said
        log = epochs_of(run_train(embedded, tmp_path / "run", "--epochs", "3", "--resume"))
    else:
        assert "stopped (Ctrl-C) in epoch 1: no epoch had finished" in said
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
        log = epochs_of(run_train(embedded, tmp_path / "run", "--epochs", "3"))
    assert [r["epoch"] for r in log] == [1, 2, 3]


@pytest.mark.parametrize("epoch, saved, said", [
    (0, 0, "in epoch 1: no epoch had finished, so there is nothing to resume"),
    (4, 4, "in epoch 5: epochs 1-4 are in run/checkpoint.pt; the same command with --resume continues"),
    (4, 5, "in the end-of-run summary: training had finished (epochs 1-5 are in run/checkpoint.pt)")])
def test_the_ctrl_c_note_says_what_the_checkpoint_holds(epoch, saved, said):
    """The note after Ctrl-C counts the epochs the checkpoint holds, not the epoch that was running,
    and tells a run whose training had finished to evaluate rather than resume."""
    lines = []
    with pytest.raises(SystemExit) as stop:
        runs.stopped_by_ctrl_c(lines.append, Path("run"), epoch, saved, epochs=5, world=1)
    assert stop.value.code == 130 and said in lines[0]


@pytest.mark.parametrize("refresh", ["step", "epoch"])
def test_two_processes_keep_identical_banks(embedded, tmp_path, refresh):
    """torchrun with 2 CPU processes (gloo): the run completes and both ranks hold the same banks,
    with either bank refresh."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--embedded-root", str(embedded), "--out", str(out), *TRAIN_FLAGS, "--epochs", "2", "--device", "cpu",
           "--bank-refresh", refresh]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = epochs_of([json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()])
    assert len(log) == 2 and all(r["bank_spread_across_ranks"] == 0.0 for r in log)
    assert (out / "checkpoint.pt").exists()


def test_two_processes_fill_every_slot_of_the_bank_when_their_shares_differ(embedded, tmp_path):
    """--bank-init embeddings with 2 processes and 29 videos: the shares are 15 and 14 slots, so
    4 batches (the last of 3) and 3 batches (the last 2 slots join the batch before). Each process
    embeds its whole share and one update gathers both: all 29 slots are filled, none random."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--embedded-root", str(embedded), "--out", str(tmp_path / "ddp"),
           *TRAIN_FLAGS, "--epochs", "1", "--device", "cpu", "--subset", "29"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "29 of 29 slots" in done.stdout


def test_the_bank_fill_joins_a_last_batch_too_small_for_batchnorm():
    """BatchNorm over 2 clips makes their centred embeddings exact opposites, so no batch of the
    fill has fewer than train.MIN_CLIPS clips: a short last batch joins the one before."""
    assert [len(b) for b in train.fill_batches(list(range(18)), 8)] == [8, 10]
    assert [len(b) for b in train.fill_batches(list(range(19)), 8)] == [8, 8, 3]
    assert [len(b) for b in train.fill_batches(list(range(3)), 8)] == [3]  # all there is
    assert sum(train.fill_batches(list(range(18)), 8), []) == list(range(18))


def test_training_names_and_counts_a_clip_that_fails(embedded, tmp_path, monkeypatch, capsys):
    """A file that passed the scan but fails while training is named in the output, counted in the
    log, and its clip is left out of the step (the run goes on)."""
    real = data.decode_clip

    def flaky(path, *args, **kwargs):
        if "emb000001" in str(path):
            raise data.ClipError(f"{path}: simulated decode failure")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "decode_clip", flaky)
    log = epochs_of(run_train(embedded, tmp_path / "run", "--epochs", "2"))
    assert [r["data_errors"] for r in log] == [1, 1]
    assert "emb000001" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--lam", "1.5"], "--lam must be in \\[0, 1\\]"), (["--kappa", "0"], "--kappa must be > 0"),
    (["--n0", "1.0"], "--n0 must be in \\[0, 1\\)"), (["--num-negatives", "40"], "--num-negatives 40 must be smaller"),
    (["--data-root", "/no/such/folder"], "--data-root /no/such/folder is not a folder"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--oracle-targets", "class", "--mode", "xid"], "--oracle-targets needs --mode soft or robust"),
    (["--oracle-targets", "class", "--mode", "soft", "--lam", "0"], "--oracle-targets needs .* --lam > 0"),
])
def test_argument_errors_name_the_flag(embedded, tmp_path, capsys, flags, message):
    """An invalid value stops train.py with a message that names the flag and the rule."""
    with pytest.raises(SystemExit):
        train.main(["--embedded-root", str(embedded), "--out", str(tmp_path / "x"), *TRAIN_FLAGS, *flags])
    assert re.search(message, capsys.readouterr().err)


def test_data_root_without_usable_file_is_named(tmp_path):
    """A --data-root whose files are all broken is a clear error naming the split, not an empty run."""
    (tmp_path / "train" / "some_class").mkdir(parents=True)
    (tmp_path / "train" / "some_class" / "a.mp4").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no usable video in .*train"):
        train.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), *TRAIN_FLAGS])


# ----------------------------------------------------------------------------------------------
# evaluate.py: metrics on hand-made inputs, one end-to-end call, clear errors
# ----------------------------------------------------------------------------------------------


def test_recall_at_k_known_answer():
    """R@K counts a query as found when a same-class item is among its K nearest (Euclidean)."""
    gallery = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    g_labels = torch.tensor([0, 1, 2, 3])
    query = torch.tensor([[0.1], [1.9], [9.0]])
    q_labels = torch.tensor([0, 1, 2])
    # query 0 -> nearest item 0 (class 0): hit at 1. query 1 -> 2, 1, ...: hit at 2.
    # query 2 (class 2) -> 3, then 2: hit at 2.
    r = evaluate.recall_at_k(query, gallery, q_labels, g_labels, ks=(1, 2, 4))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(1.0), "R@4": pytest.approx(1.0)}
    per_class = evaluate.per_class_recall_at_1(query, gallery, q_labels, g_labels, ["a", "b", "c", "d"])
    assert per_class == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_the_chunked_search_finds_what_one_distance_matrix_finds():
    """nearest_neighbours computes the distances a chunk of queries at a time (Kinetics' 20k x 240k
    at once would need 19 GB): any chunk size gives the k nearest of one full cdist."""
    g = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g)
    full = torch.cdist(query, gallery).topk(5, dim=1, largest=False).indices
    for chunk in (1, 7, 50, None):
        assert torch.equal(evaluate.nearest_neighbours(query, gallery, 5, chunk=chunk), full)


def test_video_level_prediction_averages_softmax_over_clips():
    """Video top-1 takes the argmax of the mean softmax over clips; clip top-1 scores every clip."""
    # video 0 (label 0): clips say 0, 0, 1 -> video right, 2/3 clips right
    # video 1 (label 1): clips say 0 (barely), 0 (barely), 1 (confidently) -> video right, 1/3 clips
    logits = torch.tensor([[[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]],
                           [[0.1, 0.0], [0.1, 0.0], [0.0, 5.0]]])
    clip, video = evaluate.clip_and_video_top1(logits, torch.tensor([0, 1]))
    assert clip == pytest.approx(3 / 6) and video == 1.0


def test_detection_metrics_known_injected_set():
    """ROC AUC of -s and precision of the n lowest scores, n = number of faulty pairs."""
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.85])
    faulty = np.array([0, 1, 0, 1, 0, 0], dtype=bool)
    d = evaluate.detection_metrics(s, faulty)
    assert d == {"auc": 1.0, "precision_at_n": 1.0, "n_faulty": 2, "n_scored": 6, "chance": 2 / 6}
    faulty = np.array([0, 1, 0, 0, 1, 0], dtype=bool)       # one faulty pair hides at 0.7
    d = evaluate.detection_metrics(s, faulty)
    brute = np.mean([float(-s[i] > -s[j]) for i in np.flatnonzero(faulty) for j in np.flatnonzero(~faulty)])
    assert d["auc"] == pytest.approx(brute) and d["precision_at_n"] == 0.5
    assert evaluate.roc_auc([1, 1, 1], [True, False, False]) == 0.5  # ties count half


def test_evaluate_end_to_end(embedded, tmp_path):
    """A tiny run, evaluated: downstream tables, per-class R@1, the retrieval grid, detection, and
    results.json merged with what train.py wrote."""
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "1", "--n0", "0.25")
    (out / "results.json").write_text(json.dumps({"kept": 1}))
    r = evaluate.main([str(out), "--clips", "2", "--ft-epochs", "1", "--workers", "0", "--queries", "3"])
    for name, classes in (("ucf", 18), ("hmdb", 12)):
        assert r[name]["classes"] == classes and {"R@1", "R@5", "R@10"} <= set(r[name]["retrieval"])
        for key in ("linear_probe_video_top1", "finetune_clip_top1", "finetune_video_top1"):
            assert 0 <= r[name][key] <= 1
    assert r["detection_injected"]["n_faulty"] == 10 and len(r["most_likely_faulty"]) == 40
    assert sum(x["injected"] for x in r["most_likely_faulty"]) == 10
    assert len(r["top4_retrievals"]) == 3 and all(len(row) == 5 for row in r["top4_retrievals"])
    assert np.load(out / "retrievals.npz")["frames"].shape == (3, 5, 112, 112, 3)
    saved = json.loads((out / "results.json").read_text())
    assert saved["kept"] == 1 and "per_class_R@1" in saved and "ucf" in saved


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_keeps_the_recipe_and_a_refused_resume_writes_nothing(embedded, tmp_path, capsys):
    """--resume continues one recipe: a flag other than the epochs, workers, device, precision or
    logging (here λ, the warm-up, the seed) is refused, naming it, before anything in the run
    folder is rewritten. A run saved without fp16 (its GradScaler state is empty) resumes under
    --amp fp16."""
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "1", "--n0", "0.25")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for flags, named in ((["--lam", "0.25"], "--lam 0.5, not 0.25"),
                         (["--warmup-epochs", "2"], "--warmup-epochs 1, not 2"),
                         (["--seed", "1"], "--seed 0, not 1")):
        with pytest.raises(SystemExit):
            run_train(embedded, out, "--epochs", "2", "--n0", "0.25", *flags, "--resume")
        assert named in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, flags
    log = epochs_of(run_train(embedded, out, "--epochs", "2", "--n0", "0.25", "--amp", "fp16",
                              "--resume"))
    assert [r["epoch"] for r in log] == [1, 2]


def test_a_run_folder_has_one_writer_and_a_new_run_drops_stale_results(embedded, tmp_path):
    """Two runs into one --out would interleave logs and checkpoints: while another process holds
    the folder (as a running train.py does), a run is refused before writing anything.
    A new run into a folder that has a results.json but no checkpoint does not merge into it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"ucf": {"retrieval": {"R@5": 0.99}}}')  # another run's
    holder = subprocess.Popen(                      # another process holds the folder, as a run
        [sys.executable, "-c", f"import runs, sys; held = runs.hold_run_folder(__import__('pathlib')"
                               f".Path({str(out)!r})); print('held', flush=True); sys.stdin.read()"],
        cwd=Path(__file__).parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match="another run is writing"):
        run_train(embedded, out, "--epochs", "1")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.json"]
    holder.communicate("")                          # that process ends: the folder is free
    run_train(embedded, out, "--epochs", "1")
    assert not (out / "results.json").exists()           # --no-eval: nothing evaluated yet
    run_train(embedded, out, "--epochs", "2", "--resume")  # the first run let the folder go


def test_results_say_which_epoch_each_part_was_evaluated_at(embedded, tmp_path):
    """results.json labels the downstream numbers with the epoch and protocol they were made at,
    only when one call made all of them: after a --resume to more epochs, an evaluation that skips
    UCF and HMDB leaves their epoch-1 label (so a sweep does not take them for epoch 2's), and
    labels the pre-training-set part with its own epoch."""
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "1", "--n0", "0.25")
    quick = ["--clips", "2", "--ft-epochs", "1", "--workers", "0", "--queries", "3"]
    evaluate.main([str(out), *quick])
    run_train(embedded, out, "--epochs", "2", "--n0", "0.25", "--resume")
    evaluate.main([str(out), *quick, "--skip", "ucf", "hmdb"])
    r = json.loads((out / "results.json").read_text())
    assert r["evaluated_epoch"] == 1 and r["pretrain_evaluated_epoch"] == 2
    assert r["protocol"]["ucf_root"] is None  # the embedded stand-ins
    evaluate.main([str(out), *quick, "--skip", "hmdb", "pretrain"])  # one set again: a mixture
    r = json.loads((out / "results.json").read_text())
    assert r["evaluated_epoch"] is None and r["protocol"] is None


def test_a_shared_checkpoint_cannot_run_code(embedded, tmp_path):
    """runs.load_checkpoint reads tensors and plain data only: a checkpoint carrying an object
    that would run code when unpickled is refused with a message naming the file, and the code
    does not run (evaluate.py on a checkpoint someone shared; train.py --resume alike)."""
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "1")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["args"]["note"] = _RunsCodeWhenUnpickled(marker)
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="checkpoint.pt: refused"):
        evaluate.main([str(out), "--skip", "ucf", "hmdb", "pretrain"])
    with pytest.raises(SystemExit, match="checkpoint.pt: refused"):
        run_train(embedded, out, "--epochs", "2", "--resume")
    assert not marker.exists()


def test_evaluate_errors_are_clear(embedded, tmp_path):
    """evaluate.py names a missing checkpoint, one that does not fit its architecture, and a
    downstream set with no usable video."""
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main([str(tmp_path / "missing_run")])
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "1")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["args"]["video_arch"] = "r2plus1d_18"                  # a checkpoint that does not fit its arch
    torch.save(ckpt, tmp_path / "other_arch.pt")
    with pytest.raises(SystemExit, match="does not fit the architecture"):
        evaluate.main([str(tmp_path / "other_arch.pt")])
    broken = tmp_path / "ucf"
    (broken / "videos" / "A").mkdir(parents=True)
    (broken / "videos" / "A" / "v_A_g01_c01.avi").write_bytes(b"")
    (broken / "splits").mkdir()
    (broken / "splits" / "classInd.txt").write_text("1 A\n")
    (broken / "splits" / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\n")
    (broken / "splits" / "testlist01.txt").write_text("A/v_A_g01_c01.avi\n")
    with pytest.raises(FileNotFoundError, match="no usable video in ucf"):
        evaluate.main([str(out), "--ucf-root", str(broken / "videos"), "--ucf-splits", str(broken / "splits"),
                       "--skip", "hmdb", "pretrain", "--workers", "0"])


# ----------------------------------------------------------------------------------------------
# plots.py: the figures of a run, the sweep's bookkeeping
# ----------------------------------------------------------------------------------------------


def test_run_figures_are_drawn(embedded, tmp_path):
    """Figures 3-4, the score histogram and the training curves come from a run's files alone."""
    out = tmp_path / "run"
    run_train(embedded, out, "--epochs", "2", "--n0", "0.25")
    evaluate.main([str(out), "--clips", "2", "--ft-epochs", "1", "--workers", "0", "--queries", "2", "--skip", "ucf", "hmdb"])
    assert "protocol" not in json.loads((out / "results.json").read_text())  # it describes ucf/hmdb numbers: none made
    plots.main(["run", str(out), "--out", str(tmp_path / "figs")])
    plots.main(["targets", str(out), "--per-class", "3", "--out", str(tmp_path / "figs" / "soft_targets")])
    for name in ("fig3_per_class_r1", "fig4_retrievals", "score_histogram", "training_curves", "soft_targets"):
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 5000
        assert (tmp_path / "figs" / f"{name}.pdf").exists()


def test_sweep_skips_finished_points_and_draws(tmp_path):
    """A grid point with complete results is not trained again (an interrupted sweep resumes);
    the figures draw mean ± std over seeds from the results alone."""
    args = argparse.Namespace(epochs=3, eval_clips=2, seeds=[0, 1], deltas=[-1.0, 0.0], n0=[0.25, 0.5], lams=[0.0, 0.5],
                              oracle=True, workers=2, ft_repeats=2)
    rng = np.random.default_rng(0)
    fake = lambda: {"evaluated_epoch": 3, "protocol": plots.evaluate_protocol(point, args),  # noqa: E731
                    **{ds: {"finetune_video_top1": rng.random(), "retrieval": {"R@5": rng.random()}} for ds in ("ucf", "hmdb")}}
    point = tmp_path / "p"
    point.mkdir()
    (point / "results.json").write_text(json.dumps(fake()))
    assert plots.train_and_evaluate_point(point, ["--mode", "xid"], args) == json.loads((point / "results.json").read_text())
    assert not (point / "checkpoint.pt").exists()                          # nothing was trained
    table = {(n0, d, s): fake() for n0 in args.n0 for d in args.deltas + ["xid", *plots.ORACLES] for s in args.seeds}
    table.update({(0.0, "xid", s): fake() for s in args.seeds})            # the reference without injection
    plots.draw_delta(table, args, tmp_path / "fig1")
    table = {(lam, s): fake() for lam in args.lams for s in args.seeds}
    table.update({(lam, "oracle", s): fake() for lam in args.lams if lam > 0 for s in args.seeds})
    plots.draw_lambda(table, args, tmp_path / "fig2")
    assert (tmp_path / "fig1.png").exists() and (tmp_path / "fig2.pdf").exists()


def test_the_lambda_sweep_trains_the_class_oracle_at_every_positive_lambda(tmp_path, monkeypatch):
    """Figure 2's bound: at each λ > 0 and seed, Soft-xID with --oracle-targets class beside the
    cycle's point (at λ = 0 both are xID: one run); --no-oracle leaves it out."""
    trained = []
    monkeypatch.setattr(plots.embedded_dataset, "ensure", lambda root: None)
    monkeypatch.setattr(plots, "train_and_evaluate_point", lambda run_dir, flags, args: trained.append(flags) or {})
    args = argparse.Namespace(runs=str(tmp_path), embedded_root="unused", seeds=[0, 1], lams=[0.0, 0.5, 1.0],
                              oracle=True, epochs=3)
    table = plots.sweep("lambda", args)
    oracle = [f for f in trained if "--oracle-targets" in f]
    assert {(f[f.index("--lam") + 1], f[f.index("--seed") + 1]) for f in oracle} == \
        {(lam, str(s)) for lam in ("0.5", "1.0") for s in (0, 1)} and len(oracle) == 4
    assert len(table) == 10 and (0.5, "oracle", 1) in table and (0.0, "oracle", 0) not in table
    trained.clear()
    plots.sweep("lambda", argparse.Namespace(**{**vars(args), "oracle": False}))
    assert not [f for f in trained if "--oracle-targets" in f] and len(trained) == 6


def test_a_point_evaluated_under_another_protocol_is_evaluated_again_not_trained(tmp_path, monkeypatch):
    """results.json records evaluate.py's protocol; when the sweep's differs (here a fine-tuning
    schedule from before), the point's checkpoint is evaluated again and nothing is trained."""
    args = argparse.Namespace(epochs=3, eval_clips=2, workers=2, ft_repeats=2, embedded_root="unused", warmup_epochs=1)
    point = tmp_path / "n0_0_xid_seed0"
    point.mkdir()
    torch.save({"epoch": 2}, point / "checkpoint.pt")                       # all 3 epochs trained
    old = {**plots.evaluate_protocol(point, args), "ft_schedule": "constant", "ft_epochs": 8}
    (point / "results.json").write_text(json.dumps({"evaluated_epoch": 3, "protocol": old, "ucf": {}, "hmdb": {}}))
    assert plots.finished_results(point, ["--mode", "xid"], args) is None
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(("train", argv)))
    monkeypatch.setattr(evaluate, "main", lambda argv: calls.append(("evaluate", argv)) or "evaluated")
    assert plots.train_and_evaluate_point(point, ["--mode", "xid"], args) == "evaluated"
    assert [c[0] for c in calls] == ["evaluate"] and "--ft-repeats" in calls[0][1]


def test_the_delta_sweep_trains_the_oracle_at_every_injected_n0(tmp_path, monkeypatch):
    """Figure 1's oracle: at each n₀ > 0, Weighted-xID with --oracle-weights w-min and zero, every
    seed; xID at n₀ = 0 as the reference; --no-oracle leaves the oracle out."""
    trained = []
    monkeypatch.setattr(plots.embedded_dataset, "ensure", lambda root: None)
    monkeypatch.setattr(plots, "train_and_evaluate_point", lambda run_dir, flags, args: trained.append(flags) or {})
    args = argparse.Namespace(runs=str(tmp_path), embedded_root="unused", seeds=[0, 1, 2], deltas=[-1.0], n0=[0.5],
                              oracle=True, epochs=3)
    table = plots.sweep("delta", args)
    oracle = [f for f in trained if "--oracle-weights" in f]
    assert len(oracle) == 6 and {(f[f.index("--oracle-weights") + 1], f[f.index("--seed") + 1]) for f in oracle} == \
        {(o, str(s)) for o in ("w-min", "zero") for s in (0, 1, 2)}
    assert all(f[f.index("--n0") + 1] == "0.5" and f[:2] == ["--mode", "weighted"] for f in oracle)
    assert (0.5, "zero", 2) in table and (0.0, "xid", 1) in table
    trained.clear()
    plots.sweep("delta", argparse.Namespace(**{**vars(args), "oracle": False}))
    assert not [f for f in trained if "--oracle-weights" in f] and len(trained) == 9


def test_the_readmes_training_step_runs_as_written(embedded):
    """The README's "training step" is real code: run as written (on the tiny dataset, one epoch,
    K and the batch sized to it), it takes steps with a finite loss and moves the batch's bank
    slots towards the new embeddings, v̄_i <- normalize(m v̄_i + (1 - m) v_i) with m = 0.5."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## The training step", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in (('"data/embedded/kinetics"', repr(str(embedded / "kinetics"))),
                     ('"data/embedded"', repr(str(embedded))),
                     ("range(20)", "range(1)"), ("num_negatives=240", "num_negatives=16"),
                     ("batch_size=32", "batch_size=8")):
        assert old in code, f"the README's step no longer has {old}: update this test with it"
        code = code.replace(old, new)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert torch.isfinite(ns["loss"])
    index, v = ns["batch"]["index"], ns["v"].detach()
    cos = (ns["criterion"].bank.v_bar[index] * v).sum(1)   # a random start vector would give ~0
    assert (cos > 0.5).all()


def test_oracle_weights_come_from_the_ground_truth(embedded, tmp_path):
    """--oracle-weights: the injected pairs of the batch get w_min (or 0), all others 1, whatever the
    scores say; without injection (or with xID) the flag is refused."""
    K = 8
    loss = losses.RobustXIDLoss(20, 16, mode="weighted", num_negatives=K, w_min=0.25)
    faulty = torch.zeros(20, dtype=torch.bool)
    faulty[[3, 7]] = True
    v = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    index = torch.tensor([0, 3, 5, 7, 9, 11])
    for weight in (0.25, 0.0):
        loss.set_oracle(faulty, weight)
        _, diag = loss(v, a, index)
        assert diag["weights"].tolist() == [1.0, weight, 1.0, weight, 1.0, 1.0]
    loss.set_oracle(torch.ones(20, dtype=torch.bool), 0.0)
    total, _ = loss(v, a, index)
    assert total.item() == 0.0                               # all weights 0: no loss, not 0/0
    with pytest.raises(SystemExit):
        run_train(embedded, tmp_path / "r", "--oracle-weights", "w-min", "--mode", "weighted")   # n0 = 0
    run_train(embedded, tmp_path / "o", "--oracle-weights", "zero", "--mode", "weighted", "--n0", "0.5", "--epochs", "2",
              "--warmup-epochs", "1", "--no-eval")
    log = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines() if '"epoch"' in x]
    assert log[0]["batch_mean_weight"] == 1.0 and 0.2 < log[1]["batch_mean_weight"] < 0.8  # half the pairs: 0
    # the soft targets' oracle: after the warm-up all the moved mass stays in the class
    log = epochs_of(run_train(embedded, tmp_path / "t", "--oracle-targets", "class", "--mode", "soft", "--lam", "0.5",
                              "--epochs", "2", "--warmup-epochs", "1"))
    assert log[1]["soft_mass_same_class"] == pytest.approx(1.0) and log[1]["target_on_positive"] < 1.0


# ----------------------------------------------------------------------------------------------
# What a user sees: progress on long steps, no FFmpeg noise
# ----------------------------------------------------------------------------------------------
def test_progress_in_a_log_is_whole_lines_at_intervals(capsys, monkeypatch):
    """Not on a terminal (CI, a log file): status lines with count and rate, no carriage returns."""
    import time
    monkeypatch.setattr(runs, "LOG_EVERY", 0.02)
    for _ in runs.progress(range(5), desc="testing", unit="thing"):
        time.sleep(0.03)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("testing:") for line in lines) and "5/5" in lines[-1]


def test_scanning_broken_files_prints_no_ffmpeg_messages(embedded, tmp_path):
    """FFmpeg's own log ("moov atom not found") stays quiet: the scan names the file and the reason.
    FFMPEG_LOG=1 lets it through, for debugging."""
    good = embedded / "kinetics/train/circle_horizontal/emb000000_000000_000002.mp4"
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (tmp_path / "cls" / "fine.mp4").write_bytes(good.read_bytes())
    cmd = [sys.executable, "tools/scan.py", str(tmp_path)]
    quiet = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FFMPEG_LOG": "0"})
    assert quiet.returncode == 0 and "1 usable, 1 broken" in quiet.stdout
    assert "moov" not in quiet.stdout + quiet.stderr
    assert "truncated.mp4\tcannot open / corrupt" in (tmp_path / "broken.txt").read_text()
    (tmp_path / ".scan-cache.json").unlink()                                  # probe again
    loud = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FFMPEG_LOG": "1"})
    assert "moov atom not found" in loud.stdout + loud.stderr


def test_a_scan_that_finds_nothing_usable_still_lists_every_file(tmp_path, capsys):
    """tools/scan.py on a folder where every file is broken: the list with a reason per file is
    written, then the command stops with an error (exit status 1), not a usage message."""
    import scan
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.mp4").write_bytes(b"not a video")
    (tmp_path / "cls" / "b.mp4").write_bytes(b"")
    with pytest.raises(SystemExit, match="no usable video"):
        scan.main([str(tmp_path)])
    listed = dict(line.split("\t") for line in (tmp_path / "broken.txt").read_text().splitlines())
    assert listed[str(tmp_path / "cls" / "b.mp4")] == "zero bytes"
    assert listed[str(tmp_path / "cls" / "a.mp4")].startswith("cannot open / corrupt")
    assert "usage:" not in capsys.readouterr().err


def test_a_sweep_says_which_point_of_how_many_and_when_it_ends(embedded, tmp_path, capsys, monkeypatch):
    """Point i of n before each one that must be trained, and the time left from the points so far."""
    args = argparse.Namespace(epochs=3, eval_clips=2, seeds=[0], lams=[0.0, 0.5, 1.0], runs=str(tmp_path),
                              embedded_root=str(embedded), workers=2, ft_repeats=1, oracle=False)
    finished = {"evaluated_epoch": 3, "ucf": {}, "hmdb": {}, "protocol": plots.evaluate_protocol(tmp_path, args)}
    (tmp_path / "lambda" / "lam_0_seed0").mkdir(parents=True)
    (tmp_path / "lambda" / "lam_0_seed0" / "results.json").write_text(json.dumps(finished))
    monkeypatch.setattr(plots, "train_and_evaluate_point", lambda run_dir, flags, a: finished)
    table = plots.sweep("lambda", args)
    out = capsys.readouterr().out
    assert len(table) == 3 and "3 points, 1 already done, 2 to train" in out
    assert "point 2/3 (lam_0.5_seed0), 2 to go" in out and "point 3/3 (lam_1_seed0), 1 to go, about" in out


def test_a_short_run_in_a_log_has_no_progress_bars(embedded, tmp_path, capsys):
    """Output that is not a terminal gets the epoch lines only, not a redrawn bar per step (a bar
    line comes only after 10 s, at that pace)."""
    run_train(embedded, tmp_path / "run", "--epochs", "2")
    said = capsys.readouterr()
    assert "step/s" not in said.out + said.err and said.out.count("epoch ") >= 2


@pytest.mark.parametrize("refresh", ["step", "epoch"])
def test_bank_refresh_after_each_step_or_at_the_epochs_end(embedded, tmp_path, monkeypatch, refresh):
    """--bank-refresh step updates the batch's slots right after its step (the paper's); epoch keeps
    every slot as it was until the epoch's last step, then applies the epoch's updates in order."""
    events = []
    real_loss, real_update = losses.RobustXIDLoss.forward, losses.MemoryBank.update
    monkeypatch.setattr(losses.RobustXIDLoss, "forward",
                        lambda *a, **k: events.append("step") or real_loss(*a, **k))
    monkeypatch.setattr(losses.MemoryBank, "update", lambda self, *a, **k: events.append(
        "fill" if k.get("momentum") == 0.0 else "update") or real_update(self, *a, **k))
    run_train(embedded, tmp_path / "run", "--epochs", "2", "--bank-refresh", refresh, "--no-eval")
    steps = 5                                                               # 40 videos, batch 8: 5 per epoch
    expected = ["step", "update"] * steps * 2 if refresh == "step" else (["step"] * steps + ["update"]) * 2
    assert events == ["fill"] + expected  # filled first, every slot in one update; epoch: likewise


def test_quick_sweep_uses_its_small_grid_except_where_a_flag_is_given(monkeypatch):
    """--quick: 2 seeds, 12 epochs, a small grid, its own runs and figure folders; a flag the user
    gives wins over the quick setting."""
    seen = {}
    monkeypatch.setattr(plots, "sweep", lambda kind, args: seen.update(vars(args)) or {})
    monkeypatch.setattr(plots, "draw_delta", lambda table, args, out: None)
    plots.main(["delta", "--quick", "--epochs", "5"])
    assert seen["epochs"] == 5 and seen["seeds"] == [0, 1] and seen["n0"] == [0.5] and seen["deltas"] == [-1.0]
    assert seen["runs"] == "runs/sweeps_quick" and seen["out"] == "figures/quick/fig1_delta_sweep"
    plots.main(["delta", "--quick", "--epochs", "24", "--runs", "runs/sweeps"])   # given = the full default
    assert seen["epochs"] == 24 and seen["runs"] == "runs/sweeps" and seen["seeds"] == [0, 1]
    plots.main(["delta"])
    assert seen["epochs"] == 24 and seen["runs"] == "runs/sweeps"


def test_curves_overlays_groups_of_runs_and_names_a_run_without_a_log(tmp_path, capsys):
    """plots.py curves LABEL=RUN,... draws each run's per-epoch loss (with the chance level
    2 ln(K+1), K as train.py chose it) and detection AUC, and prints for each run the epoch its loss
    first fell 0.3 below chance (10.67 at epoch 1 here, 10.97 - 0.3 = 10.67), the clean pairs' loss
    where pairs were injected; a folder without log.jsonl is named."""
    runs = []
    for k in range(2):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "args.json").write_text(json.dumps({"num_negatives": None}))
        (run / "injection.json").write_text(json.dumps({"num_instances": 480}))
        (run / "log.jsonl").write_text("".join(json.dumps({"kind": "epoch", "epoch": e, "loss": 11 - e / 3,
                                                           "natural_auc": 0.5 + e / 10}) + "\n" for e in (1, 2, 3)))
        runs.append(str(run))
    drawn = []
    real = plots.plt.Axes.axhline
    plots.plt.Axes.axhline = lambda self, y, **k: drawn.append(y) or real(self, y, **k)
    try:
        plots.main(["curves", f"a={runs[0]}", f"b={runs[1]}", "--out", str(tmp_path / "fig")])
    finally:
        plots.plt.Axes.axhline = real
    assert (tmp_path / "fig.png").stat().st_size > 5000 and pytest.approx(2 * np.log(241)) in drawn
    said = capsys.readouterr().out
    assert f"a: {runs[0]}: loss 0.3 below chance from epoch 1, epoch 3 loss 10.000 (chance 10.97), natural AUC 0.80" in said
    # with injected pairs the line reads the clean pairs' own loss: here it leaves at epoch 2,
    # while the mean (held up by the injected half) never does
    (Path(runs[1]) / "log.jsonl").write_text("".join(json.dumps(
        {"kind": "epoch", "epoch": e, "loss": 11.0, "loss_clean_pairs": 11 - e / 4}) + "\n" for e in (1, 2, 3)))
    plots.main(["curves", f"b={runs[1]}", "--out", str(tmp_path / "fig2")])
    said = capsys.readouterr().out
    assert (f"b: {runs[1]}: clean pairs' loss 0.3 below chance from epoch 2, epoch 3 loss 11.000 "
            "(clean pairs 10.250) (chance 10.97)") in said
    with pytest.raises(SystemExit):
        plots.main(["curves", f"a={tmp_path / 'nothing'}"])
    assert "none in" in capsys.readouterr().err


def test_centred_heads_spread_a_random_encoders_embeddings():
    """model.projection_head: a randomly initialised encoder maps every clip to nearly the same
    direction (its ReLU features are all positive), where xID's softmax over the candidates is flat;
    the parameter-free BatchNorm at the end of the heads centres a batch's embeddings first."""
    torch.manual_seed(0)
    video, audio = torch.randn(16, 3, 4, 32, 32), torch.randn(16, 1, 40, 100)

    def mean_cosine(centred):
        torch.manual_seed(1)
        v, a = model.AVModel(centred_heads=centred)(video, audio)
        return [((x @ x.T).sum() - len(x)).item() / (len(x) ** 2 - len(x)) for x in (v, a)]
    assert min(mean_cosine(False)) > 0.5 and max(mean_cosine(True)) < 0.2


def test_the_bank_is_filled_slot_by_slot_before_the_first_step_unless_asked_for_random(embedded, tmp_path, capsys):
    """--bank-init embeddings: every slot (the ones the training loader's dropped last batch would
    miss too) holds the initial encoders' embedding, with its score s_i = v̄_i·ā_i; random: untouched."""
    for init in ("embeddings", "random"):
        parser, args = train.get_args(["--embedded-root", str(embedded), "--out", str(tmp_path / init), *TRAIN_FLAGS,
                                       "--batch-size", "6", "--bank-init", init])   # 40 videos: 6 x 6 + 4
        run = train.set_up(parser, args)
        start = run.criterion.bank.v_bar.clone()
        if init == "embeddings":
            train.fill_bank(run, args)
        bank = run.criterion.bank
        changed = (bank.v_bar - start).norm(dim=1) > 1e-6
        assert changed.all() if init == "embeddings" else not changed.any()
        assert torch.allclose(bank.s, (bank.v_bar * bank.a_bar).sum(1))
    capsys.readouterr()
    for init in ("random", "embeddings"):   # train.main fills only when asked
        run_train(embedded, tmp_path / f"r_{init}", "--bank-init", init, "--epochs", "1")
        assert ("memory bank filled" in capsys.readouterr().out) == (init == "embeddings")


def test_a_sweep_refuses_a_point_trained_with_another_recipe(tmp_path):
    """A runs folder trained with another start (plain heads, random bank) is not mixed into a
    figure of the current recipe: the sweep stops and names the folder."""
    point = tmp_path / "n0_0.5_xid_seed0"
    point.mkdir()
    (point / "args.json").write_text(json.dumps({"bank_refresh": "step"}))   # no centred_heads: the old heads
    args = argparse.Namespace(epochs=24, embedded_root=str(tmp_path), warmup_epochs=3, workers=2)
    with pytest.raises(SystemExit, match="n0_0.5_xid_seed0 was trained with"):
        plots.finished_results(point, ["--mode", "xid", "--n0", "0.5", "--seed", "0"], args)


def test_a_sweep_point_must_share_every_flag_and_its_epochs(tmp_path):
    """A point is the sweep's only if train.py's flags for it are the ones it was trained with
    (all but those --resume may change) and it has no more epochs than the sweep: another warm-up
    or λ, or 30 epochs for a sweep of 24, stops the sweep and names the flag."""
    args = argparse.Namespace(epochs=24, embedded_root=str(tmp_path), warmup_epochs=3, workers=2)
    flags = ["--mode", "weighted", "--delta", "-1", "--n0", "0.5", "--seed", "0"]
    point = tmp_path / "n0_0.5_delta_-1_seed0"
    point.mkdir()
    _, trained = train.get_args(plots.point_flags(point, flags, args))
    written = json.loads(json.dumps(vars(trained)))              # as args.json holds it
    (point / "args.json").write_text(json.dumps(written))
    assert plots.finished_results(point, flags, args) is None    # its recipe, nothing evaluated yet
    for key, value, named in (("warmup_epochs", 1, "--warmup-epochs 1 (the sweep: 3)"),
                              ("lam", 0.25, "--lam 0.25 (the sweep: 0.5)"),
                              ("epochs", 30, "--epochs 30 (the sweep: 24)")):
        (point / "args.json").write_text(json.dumps({**written, key: value}))
        with pytest.raises(SystemExit) as stop:
            plots.finished_results(point, flags, args)
        assert named in str(stop.value.code)


def _weighted_loss_of_a_share(rank, world, init, out):
    """One process of test_weighted_xid_normalises_over_the_whole_batch_with_several_processes."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    v, a, index, negatives, faulty = _oracle_batch()
    crit = losses.RobustXIDLoss(20, 8, mode="weighted", num_negatives=6, seed=0)
    crit.set_oracle(faulty, 0.0)
    share = slice(0, 6) if rank == 0 else slice(6, 8)  # uneven shares, as failed decodes leave
    loss, _ = crit(v[share], a[share], index[share], negatives=negatives)
    torch.save(loss.detach(), out / f"{rank}.pt")
    dist.destroy_process_group()


def _oracle_batch():
    g = torch.Generator().manual_seed(3)
    v = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=1)
    faulty = torch.zeros(20, dtype=torch.bool)
    faulty[[0, 1, 2]] = True  # all in process 0's share: its Σ w is 3, the other's 2
    return v, a, torch.arange(8), torch.arange(10, 16), faulty


def test_weighted_xid_normalises_over_the_whole_batch_with_several_processes(tmp_path):
    """L_Weighted = Σ_i w_i L(i) / Σ_i w_i over the global batch. With 2 processes (gloo) each
    holding a share of unequal Σ w, the mean of their losses (what DDP's averaged gradient
    follows) equals the one-process loss on the whole batch; dividing each share by its own Σ w
    would not."""
    torch.multiprocessing.spawn(_weighted_loss_of_a_share, nprocs=2,
                                args=(2, f"file://{tmp_path / 'rendezvous'}", tmp_path))
    shares = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    v, a, index, negatives, faulty = _oracle_batch()
    crit = losses.RobustXIDLoss(20, 8, mode="weighted", num_negatives=6, seed=0)
    crit.set_oracle(faulty, 0.0)
    whole, _ = crit(v, a, index, negatives=negatives)
    assert torch.allclose(sum(shares) / 2, whole, atol=1e-5)
    per_share = [crit(v[s], a[s], index[s], negatives=negatives)[0] for s in (slice(0, 6),
                                                                              slice(6, 8))]
    assert abs(float(sum(per_share) / 2 - whole)) > 1e-2  # the test can tell the two apart


def test_a_parallel_sweep_stops_at_a_failed_point_and_names_its_log(embedded, tmp_path, capsys):
    """--jobs 2: each point a process with its own log; one whose train.py fails stops the sweep,
    the other is stopped too, and the error names the failed point's log. (The parallel sweep's
    successful path runs in tools/gpu_check.py --small: test_real_data.py.)"""
    args = argparse.Namespace(epochs=1, warmup_epochs=1, eval_clips=1, seeds=[0], lams=[2.0, 0.0],
                              runs=str(tmp_path), embedded_root=str(embedded), workers=0, ft_repeats=1,
                              oracle=False, jobs=2)                         # λ = 2 is outside [0, 1]
    with pytest.raises(SystemExit, match=r"lam_2_seed0 failed \(exit 2\); its output is in .*sweep.log"):
        plots.sweep("lambda", args)
    assert "started lam_0_seed0 (2 running, 0 waiting, 2 at once" in capsys.readouterr().out
    assert "--lam" in (tmp_path / "lambda" / "lam_2_seed0" / "sweep.log").read_text()
