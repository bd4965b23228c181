"""From a file to a batch: PyAV clip decoding, the dataset of clips and its batch transforms, and
the injected faulty positives (n₀). Which files there are, and which are broken, is listings.py's.

    usable files (listings.py) -> AVClips[i] = {video uint8 (3,T,H,W),
      audio waveform (1,S), index, label, faulty, jitter}  (loader workers: decode, crop, flip)
      -> batch -> BatchTransforms on the model's device: colour jitter, normalisation, log-mel
      -> video float (B,3,T,H,W), audio (B,1,F,S)

Injection lives here, not in train.py or losses.py: it decides which file each instance's audio is
read from (AVClips' audio_source), so it is a property of the data a run is served, like its
listing; the loss never knows. train.py, evaluate.py and plots.py all read it from here.
"""
import os
import random
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchaudio
from torch.utils.data import Dataset, DistributedSampler, default_collate
from torchvision.transforms import RandomResizedCrop, v2

# FFmpeg's own messages ("moov atom not found", "Error parsing Opus packet header", ...) would come
# between the project's lines, pages of them on a real download; the project names the file and the
# reason instead. torchvision switches them on when it is imported, so they are switched off after
# it. FFMPEG_LOG=1 lets them through, for debugging a file.
av.logging.set_level(av.logging.WARNING if os.environ.get("FFMPEG_LOG") == "1" else None)


@dataclass(frozen=True, order=True)
class Video:
    path: str
    label: int = -1          # class index; -1 when unknown
    duration: float = 0.0    # seconds of usable audio+video, filled in by listings.scan()


@dataclass(frozen=True)
class ClipSpec:
    """What a training clip is. Paper scale: 8 frames at 16 fps, 112 px, 2 s of audio at 24 kHz."""
    frames: int = 8
    fps: float = 8.0
    size: int = 32
    audio_seconds: float = 1.0
    sample_rate: int = 16000
    n_mels: int = 40
    need_audio: bool = True

    @property
    def video_seconds(self):
        return self.frames / self.fps

    @property
    def shortest_file_seconds(self):
        """A file shorter than this cannot give one clip (the scan calls it too short)."""
        return max(self.video_seconds, self.audio_seconds if self.need_audio else 0.0)


class ClipError(RuntimeError):
    """A file that cannot give the clip asked of it (named, counted, never replaced by another)."""


# ----------------------------------------------------------------------------------------------
# Decoding with PyAV: seek, decode only the window, resample video to fps and audio to rate/mono
# ----------------------------------------------------------------------------------------------
def _origin(container):
    """Clip times count from the first video frame; audio is read at the same absolute times, so a
    file whose streams do not start at zero (or not together) keeps sound and picture aligned."""
    if container.streams.video and container.streams.video[0].start_time is not None:
        v = container.streams.video[0]
        return float(v.start_time * v.time_base)
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _decode_frames(container, start, num_frames, fps, box=None, size=None):
    """num_frames RGB frames (T, H, W, 3) at times start + k/fps: for each, the last frame shown at
    that time, so a file with a lower fps repeats frames and a higher one drops them.
    box(height, width) -> (top, left, h, w): that region comes back resized to size x size; without
    box, the frames as stored."""
    stream = container.streams.video[0]
    times = _origin(container) + start + np.arange(num_frames) / fps
    container.seek(int(max(times[0], 0) / stream.time_base), stream=stream, backward=True)
    picked, shown = [], None  # frames are converted to RGB only once they are picked
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        while len(picked) < num_frames and frame.time > times[len(picked)] + 1e-6:
            picked.append(shown if shown is not None else frame)
        if len(picked) == num_frames:
            break
        shown = frame
    if shown is None and not picked:
        raise ClipError(f"no video frame at {start:.2f}s")
    picked += [shown] * (num_frames - len(picked))  # stream ended inside the window: hold the last
    distinct = list({id(f): f for f in picked}.values())  # each distinct frame is converted once
    if box is None:
        rgb = {id(f): f.to_ndarray(format="rgb24") for f in distinct}
        return np.stack([rgb[id(f)] for f in picked])
    height, width = picked[0].height, picked[0].width
    top, left, h, w = box(height, width)
    if min(h, w) > 2 * size:
        # a large source (a 720p download): FFmpeg scales the whole frame while converting YUV to
        # RGB, so that the box lands on size x size, then it is cut out; converting all of it at
        # full size would cost more than the decoding
        full_h, full_w = max(size, round(height * size / h)), max(size, round(width * size / w))
        top, left = (min(round(top * size / h), full_h - size),
                     min(round(left * size / w), full_w - size))
        rgb = {id(f): f.to_ndarray(format="rgb24", width=full_w, height=full_h,
                                   interpolation="AREA")[top:top + size, left:left + size]
               for f in distinct}
        return np.stack([rgb[id(f)] for f in picked])
    # a prepared file (short side 128 for 112-px crops): convert at stored size, cut the box out and
    # resize only it (torchvision, uint8), which is cheaper than scaling up the whole frame
    rgb = {id(f): f.to_ndarray(format="rgb24")[top:top + h, left:left + w] for f in distinct}
    boxes = torch.from_numpy(
        np.stack([rgb[id(f)] for f in picked])).permute(0, 3, 1, 2)  # (T, 3, h, w)
    return v2.functional.resize(boxes, [size, size], antialias=True).permute(0, 2, 3, 1).numpy()


def _decode_audio(container, start, seconds, rate):
    """Mono float waveform (rate·seconds,) from start, resampled by FFmpeg (any rate, any
    channels). The window's frames are joined first and resampled in one call: per-frame calls cost
    more than decoding them. A stream may change its channels or rate mid-file (broadcast recordings
    do), so each run of frames with one format is joined and resampled on its own."""
    stream = container.streams.audio[0]
    t0 = _origin(container) + start
    container.seek(int(max(t0, 0) / stream.time_base), stream=stream, backward=True)
    runs, first = [], None  # runs: [((format, layout, rate), [arrays])], in decoding order
    for frame in container.decode(stream):
        if frame.time is None or frame.time + frame.samples / frame.sample_rate < t0:
            continue
        first = frame.time if first is None else first
        kind = (frame.format.name, frame.layout.name, frame.sample_rate)
        if not runs or runs[-1][0] != kind:
            runs.append((kind, []))
        runs[-1][1].append(frame.to_ndarray())
        if frame.time > t0 + seconds:
            break
    if first is None:
        raise ClipError(f"no audio at {start:.2f}s")
    wave = np.concatenate([_mono_at(rate, kind, arrays) for kind, arrays in runs])
    offset, n = int(round((t0 - first) * rate)), int(round(seconds * rate))
    if offset < 0:  # the audio stream starts after t0: silence before it
        wave, offset = np.concatenate([np.zeros(-offset, np.float32), wave]), 0
    wave = wave[offset:offset + n]
    return np.pad(wave, (0, n - len(wave)))


def _mono_at(rate, kind, arrays):
    """Decoded frames of one format, layout and rate -> mono float32 at `rate`."""
    fmt, layout, in_rate = kind
    joined = np.concatenate(arrays, axis=1)
    if fmt in ("flt", "fltp") and layout == "mono" and in_rate == rate:
        return joined.reshape(-1)  # already what we want (AAC decodes to fltp)
    frame = av.AudioFrame.from_ndarray(joined, format=fmt, layout=layout)
    frame.sample_rate = in_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    return np.concatenate([f.to_ndarray().reshape(-1)
                           for f in resampler.resample(frame) + resampler.resample(None)])


def decode_clip(path, video_start, spec, audio_path=None, audio_start=None, box=None):
    """Decode one clip: frames (T, H, W, 3) uint8 (or, with box, that region at spec.size x
    spec.size) and waveform (S,) float32, or None without audio. The audio may come from another
    file (an injected faulty positive)."""
    path, audio_path = str(path), str(audio_path or path)
    audio_start = video_start if audio_start is None else audio_start
    try:
        with av.open(path) as c:
            frames = _decode_frames(c, video_start, spec.frames, spec.fps, box, spec.size)
            if not spec.need_audio:
                return frames, None
            if audio_path == path:  # the same container serves both streams
                return frames, _decode_audio(c, audio_start, spec.audio_seconds, spec.sample_rate)
        with av.open(audio_path) as c:
            return frames, _decode_audio(c, audio_start, spec.audio_seconds, spec.sample_rate)
    except Exception as e:  # noqa: BLE001 -- FFmpeg errors, a missing stream, audio whose layout
        # changes mid-file (frames that no longer concatenate), ...: all are this file's fault, so
        # the clip is reported with the file's name and left out, never replaced by another video.
        what = "" if isinstance(e, ClipError) else f"{type(e).__name__}: "
        raise ClipError(f"{path if audio_path == path else f'{path} (audio {audio_path})'}: "
                        f"{what}{e}") from e


def centre_box(height, width):
    """The largest centred square: with resizing to size x size, Resize(size) + CenterCrop(size)."""
    m = min(height, width)
    return (height - m) // 2, (width - m) // 2, m, m


# ----------------------------------------------------------------------------------------------
# The dataset: decode + crop in the loader workers; jitter, normalisation, log-mel on the batch
# ----------------------------------------------------------------------------------------------
JITTER = 0.4  # colour jitter: factors in [0.6, 1.4], as torchvision's ColorJitter(0.4, 0.4, 0.4)


class AVClips(Dataset):
    """Clips of a list of videos. Item i is instance i (its memory-bank slot):
    {video uint8 (3, T, size, size), audio waveform (1, S), index, label, faulty, jitter (3,)}.

    train=True: one random clip, random resized crop, horizontal flip, volume jitter, and the
    colour jitter's factors (applied by BatchTransforms). Every one of these draws comes from a
    generator seeded by (seed, epoch, i) when the key is (epoch, i), as EpochSampler gives it: the
    clip is the same in whichever loader process makes it, so a resumed run, or one with another
    number of workers, sees the clips the uninterrupted run saw. A plain key i draws from the
    process's own RNG (fine-tuning's shuffled loader).
    train=False: `num_clips` uniformly spaced clips, centre crop (video (n, 3, T, H, W),
    audio (n, 1, S)).
    Colour jitter, normalisation and the log-mel spectrogram run on whole batches in
    BatchTransforms, where the model runs: the workers only decode, which is the loader's floor.
    audio_source[i] = j gives instance i the audio of video j (faulty-positive injection). A clip
    that fails to decode comes back as {"index", "error"}; collate_clips drops and reports it.
    """

    def __init__(self, videos, spec=ClipSpec(), train=True, num_clips=1, audio_source=None,
                 seed=0):
        self.videos, self.spec, self.train, self.num_clips = videos, spec, train, num_clips
        self.audio_source = audio_source if audio_source is not None else torch.arange(len(videos))
        self.seed = seed

    def __len__(self):
        return len(self.videos)

    def _starts(self, video, rng):
        free = max(video.duration - self.spec.video_seconds, 0.0)
        if self.train:
            return [rng.uniform(0.0, free)]
        return list(np.linspace(0.0, free, self.num_clips))

    def _box(self, rng):
        def box(height, width):
            if not self.train:
                return centre_box(height, width)
            # torchvision draws the box (area 40-100% of the frame, aspect 3/4-4/3) from torch's
            # CPU generator, here seeded from the clip's and restored after; FFmpeg applies it
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**62)))
                return RandomResizedCrop.get_params(torch.empty(1, height, width),
                                                    [0.4, 1.0], [3 / 4, 4 / 3])
        return box

    def audio_start(self, video_start, audio_duration):
        """The audio window is centred on the video window (same moment), clipped to its file."""
        a_start = video_start + (self.spec.video_seconds - self.spec.audio_seconds) / 2
        return min(max(a_start, 0.0), max(audio_duration - self.spec.audio_seconds, 0.0))

    def _clip(self, video, audio_video, start, rng):
        spec = self.spec
        frames, wave = decode_clip(video.path, start, spec, audio_video.path,
                                   self.audio_start(start, audio_video.duration),
                                   box=self._box(rng))
        if self.train and rng.random() < 0.5:
            frames = frames[:, :, ::-1]                                           # horizontal flip
        video_t = torch.from_numpy(
            np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))  # (3, T, H, W) uint8
        if wave is None:
            return video_t, None
        if self.train:
            wave = wave * rng.uniform(0.7, 1.3)                                   # volume jitter
        return video_t, torch.from_numpy(wave)[None]                              # (1, S)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # (epoch, i): this clip's draws are fixed by (seed, epoch, i)
            epoch, i = key
            rng = np.random.default_rng([self.seed, epoch, i])
        else:  # the process's own stream (evaluation draws nothing)
            i, rng = key, np.random.default_rng(random.getrandbits(64) if self.train else 0)
        video = self.videos[i]
        j = int(self.audio_source[i])
        try:
            clips = [self._clip(video, self.videos[j], s, rng) for s in self._starts(video, rng)]
        except ClipError as e:
            return {"index": i, "error": str(e)}
        item = {"index": i, "label": video.label, "faulty": j != i}
        for name, parts in zip(("video", "audio"), zip(*clips)):
            if parts[0] is not None:
                item[name] = parts[0] if self.train else torch.stack(parts)
        if self.train:  # brightness, contrast, saturation factors, each in [0.6, 1.4]
            item["jitter"] = torch.from_numpy(rng.uniform(1 - JITTER, 1 + JITTER, 3)).float()
        return item


class EpochSampler(DistributedSampler):
    """DistributedSampler (this process's share of a seeded permutation per epoch) that yields
    (epoch, i) keys, so that AVClips draws each clip from (seed, epoch, i) in any worker."""

    def __iter__(self):
        epoch = self.epoch  # the epoch this iteration was asked for, whatever set_epoch does next
        return ((epoch, i) for i in super().__iter__())


class BatchTransforms(torch.nn.Module):
    """The half of the pipeline that runs on a whole batch, on the model's device: colour jitter
    per clip with the factors AVClips drew (train), scaling and normalisation, and the waveform's
    log-mel spectrogram (mel_spectrogram). One batched STFT on the model's device costs little;
    per clip in a loader worker it would compete with the decoding."""

    def __init__(self, spec=ClipSpec(), train=True):
        super().__init__()
        self.train_mode = train
        self.mel = mel_spectrogram(spec.sample_rate, spec.n_mels)

    def video(self, x, jitter=None):
        """uint8 (..., 3, T, H, W) -> float (..., 3, T, H, W), normalised. Training batches are
        (B, 3, T, H, W) with jitter (B, 3): each clip's brightness, contrast, saturation factors."""
        x = x.float().div_(255.0)  # in place on the fresh float copy, here and below
        if self.train_mode:
            if jitter is None:
                raise ValueError("BatchTransforms(train=True).video needs the clips' jitter "
                                 "factors (the batch's 'jitter')")
            x = colour_jitter(x, jitter.to(x.device))
        return x.sub_(0.45).div_(0.225)

    def audio(self, wave):
        """waveform (..., 1, S) -> log-mel (..., 1, F, S')."""
        with torch.autocast(wave.device.type, enabled=False):  # the spectrogram stays float32
            return log_mel(self.mel, wave.float())


def colour_jitter(x, factors):
    """Brightness, contrast and saturation of every clip at once, each with the clip's own factor
    (torchvision's ColorJitter draws one setting per call; its functional ops take one factor).
    The operations are torchvision's: blend with black, with the frame's mean grey level, with the
    frame's greyscale, always in this order (ColorJitter also shuffles the order per call).
    x float (B, 3, T, H, W) in [0, 1]; factors (B, 3)."""
    b, c, s = (f.view(-1, 1, 1, 1, 1) for f in factors.unbind(-1))       # (B, 1, 1, 1, 1)

    def grey(img):  # (B, 1, T, H, W), torchvision's weights
        return v2.functional.rgb_to_grayscale(img.transpose(1, 2)).transpose(1, 2)

    # each: ratio·x + (1 - ratio)·other, clamped to [0, 1]; in place on a fresh x
    x = x.mul(b).clamp_(0, 1)                                               # brightness: black
    other = (1 - c) * grey(x).mean(dim=(-2, -1), keepdim=True)              # contrast: mean grey
    x = x.mul_(c).add_(other).clamp_(0, 1)
    other = (1 - s) * grey(x)                                               # saturation: greyscale
    return x.mul_(s).add_(other).clamp_(0, 1)


class MelPower(torch.nn.Module):
    """torchaudio's MelSpectrogram (same window, hop, filters), with the power |z|² of the STFT
    taken as re² + im²: MelSpectrogram takes abs(z) first, a square root per bin that costs more than
    the FFT on a CPU, only to square it again."""

    def __init__(self, sample_rate, n_fft, hop_length, n_mels):
        super().__init__()
        self.stft = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop_length, power=None)
        self.mel = torchaudio.transforms.MelScale(n_mels, sample_rate, n_stft=n_fft // 2 + 1)

    def forward(self, wave):
        z = self.stft(wave)                                       # complex (..., n_fft/2 + 1, frames)
        return self.mel(z.real.square() + z.imag.square())


def mel_spectrogram(sample_rate, n_mels):
    """The audio encoder's input: 40 ms windows, 100 frames/s (AVID's log spectrogram rate)."""
    return MelPower(sample_rate, n_fft=sample_rate // 25, hop_length=sample_rate // 100, n_mels=n_mels)


def max_n_mels(sample_rate):
    """The frequency bins of mel_spectrogram's window: more mel bands than that would be empty."""
    return (sample_rate // 25) // 2 + 1


def log_mel(mel, wave):
    return torch.log(mel(wave) + 1e-6)


def collate_clips(items):
    """Batch the clips that decoded; the failures are reported by name in batch["errors"]."""
    good = [it for it in items if "error" not in it]
    batch = default_collate(good) if good else {"index": torch.empty(0, dtype=torch.long)}
    batch["errors"] = [it["error"] for it in items if "error" in it]
    return batch


# ----------------------------------------------------------------------------------------------
# Faulty positives injected on purpose (n₀)
# ----------------------------------------------------------------------------------------------
def injected_mask(pairs, num_instances):
    """(N,) bool: True for the instances whose audio was injected from another instance."""
    mask = np.zeros(num_instances, dtype=bool)
    mask[[i for i, _ in pairs]] = True
    return mask


def inject_faulty_positives(num_instances, n0, seed=0):
    """A seeded fraction n₀ of instances gets the audio of another random instance (never its own).
    Returns (audio_source (N,), injected pairs [(instance, audio donor)]), fixed for the run."""
    if not 0.0 <= n0 < 1.0:
        raise ValueError(f"--n0 must be in [0, 1), got {n0}")
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.randperm(num_instances, generator=g)[: int(round(n0 * num_instances))]
              .sort().values)
    donors = torch.randint(num_instances - 1, (len(chosen),), generator=g)
    donors = donors + (donors >= chosen).long()  # skip the instance itself: never its own audio
    audio_source = torch.arange(num_instances)
    audio_source[chosen] = donors
    return audio_source, list(zip(chosen.tolist(), donors.tolist()))
