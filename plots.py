"""Figures. Each one is drawn from files on disk (clips, result JSON of runs) and saved as PNG + PDF.

    python plots.py toy-clip      # figures/toy_clip.png: what one embedded clip looks and sounds like
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

import data  # noqa: E402


def save(fig, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=130, bbox_inches="tight")
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out.with_suffix('.png')} and .pdf")


def toy_clip(root, rel, out, frames=12):
    """A frame strip over the log-mel spectrogram of the same seconds, wall hits marked on both."""
    params = json.loads((Path(root) / "toy.json").read_text())
    events = json.loads((Path(root) / "events.json").read_text())[rel]
    seconds, fps, rate = params["seconds"], frames / params["seconds"], params["rate"]
    spec = data.ClipSpec(frames=frames, fps=fps, audio_seconds=seconds, sample_rate=rate)
    strip, wave = data.decode_clip(Path(root) / rel, 0.0, spec)
    mel = torchaudio.transforms.MelSpectrogram(rate, n_fft=rate // 25, hop_length=rate // 100, n_mels=64)
    logmel = torch.log(mel(torch.from_numpy(wave)) + 1e-6).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.2), gridspec_kw={"height_ratios": [1, 1.3]})
    top.imshow(np.concatenate(list(strip), axis=1), extent=(0, seconds, 0, seconds / frames))
    top.set_yticks([])
    top.set_title(f"{rel.split('/')[2]}: {frames} frames over {seconds:g} s (one instance)")
    bottom.imshow(logmel, origin="lower", aspect="auto", cmap="gray_r", extent=(0, seconds, 0, logmel.shape[0]))
    bottom.set_ylabel("mel bin")
    bottom.set_xlabel("time (s)")
    for ax in (top, bottom):
        for e in events:
            ax.axvline(e, color="k", ls="--", lw=1)
    bottom.set_title("log-mel spectrogram: a click and a decaying tone at each wall hit (dashed)")
    fig.tight_layout()
    save(fig, out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy-clip", help="frame strip + spectrogram of one embedded clip")
    t.add_argument("--root", default="data/toy", help="the embedded dataset (generated if missing)")
    t.add_argument("--clip", default="kinetics/train/red_circle_horizontal/red000003_000000_000003.mp4",
                   help="clip path relative to --root")
    t.add_argument("--out", default="figures/toy_clip", help="output path without extension")
    args = p.parse_args()
    if args.cmd == "toy-clip":
        data.ensure_toy(args.root)
        toy_clip(args.root, args.clip, args.out)


if __name__ == "__main__":
    main()
