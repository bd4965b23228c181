"""What a run writes, and what it prints.

One folder per run (train.py's --out):
    args.json       every flag
    log.jsonl       one record per logged step and per epoch
    checkpoint.pt   enough to resume, written after every epoch
    injection.json  the injected faulty pairs (n₀)
    broken.txt      the files the scan left out, and why
    results.json    the end-of-run summary and evaluate.py's numbers (merged, never overwritten)
Every file is written whole or not at all (a temporary file, then a rename), so a run killed at
any moment leaves the previous version of each file; .lock lets one run at a time write there.

On the console: tqdm's bar on a terminal; in a log file or CI, the same status as a plain line
every few seconds, so that a long step is never silent and a log is never a wall of bars.
"""
import fcntl
import json
import os
import pickle
import sys
from pathlib import Path

import torch
from tqdm import tqdm

LOG_EVERY = 10.0  # seconds between status lines when the output is not a terminal


# ----------------------------------------------------------------------------------------------
# Files, written atomically
# ----------------------------------------------------------------------------------------------
def atomic_write(path, text):
    """Write a text file so that a crash leaves the old version or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def save_checkpoint(state, path):
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint of train.py, mapped to the CPU (load_state_dict then copies each tensor to the
    device it lives on). Read as data only (tensors, numbers, strings, lists, dicts): a shared
    checkpoint that holds other Python objects could run code when unpickled, so it is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        raise SystemExit(f"{path}: refused: it holds types other than tensors and plain data, "
                         f"which unpickling could use to run code "
                         f"({'; '.join(named) or 'see torch.load'})")


def hold_run_folder(out):
    """One run writes to a folder at a time: a second process that asks for it is refused. The
    lock belongs to this process (a POSIX record lock: the loader's worker processes do not inherit
    it) and ends when the returned file is closed or the process ends, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise SystemExit(f"--out {out}: another run is writing to this folder; wait for it to "
                         f"end, or give another --out") from None
    return lock


def write_run_folder(out, args, videos, pairs, broken):
    """args.json, injection.json (the injected pairs, by instance and by file), broken.txt; a new
    run also drops a results.json left in the folder, which would describe another run."""
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "results.json").unlink(missing_ok=True)
    atomic_write(out / "args.json", json.dumps(vars(args), indent=1))
    atomic_write(out / "injection.json", json.dumps(
        {"n0": args.n0, "seed": args.seed, "num_instances": len(videos),
         "pairs": [{"instance": i, "audio_from": j, "video": videos[i].path,
                    "audio_video": videos[j].path} for i, j in pairs]}, indent=1))
    atomic_write(out / "broken.txt", "".join(f"{p}\t{r}\n" for p, r in broken))


def merge_results(run_dir, results):
    """Add to RUN_DIR/results.json, keeping what other steps wrote there."""
    path = Path(run_dir) / "results.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    atomic_write(path, json.dumps(merged, indent=1))
    return path


def epoch_records(run_dir):
    """The epoch records of a run's log.jsonl, in order."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


class RunLog:
    """log.jsonl, one JSON object per line; written by rank 0 only."""

    def __init__(self, out, active):
        self.path, self.active = Path(out) / "log.jsonl", active

    def write(self, **record):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def start(self):
        if self.active:
            self.path.unlink(missing_ok=True)

    def resume_at(self, epoch, epoch_record):
        """Drop what was logged after the checkpoint (steps of an epoch that did not finish, a line
        cut short by the kill) and add the checkpoint's own epoch record if the run died before
        writing it, so the log has every epoch and step once."""
        if not self.active:
            return
        kept = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["epoch"] <= epoch:
                kept.append(record)
        if epoch_record and not any(r["kind"] == "epoch" and r["epoch"] == epoch for r in kept):
            kept.append(epoch_record)
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------------------------
# The console
# ----------------------------------------------------------------------------------------------
def epoch_line(summary, args, epoch):
    """The epoch's line: the loss, what the loss applied (weights after the warm-up, soft targets
    where λ > 0), detection, speed."""
    parts = [f"epoch {epoch + 1}/{args.epochs}: loss {summary.get('loss', float('nan')):.3f}"
             + (f" (clean pairs {summary['loss_clean_pairs']:.3f})"
                if "loss_clean_pairs" in summary else "")]
    if args.mode in ("weighted", "robust") and not summary.get("warmup", False):
        parts.append(f"weight applied {summary['batch_mean_weight']:.2f} " + (
            "(oracle)" if args.oracle_weights != "off" else
            f"(W(s) < 0.5 on {100 * summary['w_share_below_half']:.0f}% of slots)"))
    if "soft_mass_same_class" in summary:
        oracle = getattr(args, "oracle_targets", "off") != "off"
        parts.append(f"target on positive {summary['target_on_positive']:.2f}"
                     + (" (class oracle)" if oracle else "") + ", moved mass in class "
                     f"{summary['soft_mass_same_class']:.2f} "
                     f"(chance {summary['same_class_share']:.2f})")
    parts += [f"{kind} AUC {summary[f'{kind}_auc']:.2f}" for kind in ("injected", "natural")
              if f"{kind}_auc" in summary]
    parts.append(f"{summary['clips_per_s']:.0f} clips/s  "
                 f"data wait {100 * summary['data_wait_fraction']:.0f}%")
    if summary["data_errors"]:
        parts.append(f"data errors {summary['data_errors']}")
    return "  ".join(parts)


def stopped_by_ctrl_c(log, out, epoch, saved, epochs, world):
    """Say what the checkpoint holds (`saved` epochs of `epochs`) and how to go on, then leave with
    the shell's code for Ctrl-C. With several processes, leave without destructors, as
    distributed.end_processes explains (under torchrun, a rank waiting in a collective for one
    that has left may also end with the backend's error)."""
    kept = ("epoch 1 is" if saved == 1 else f"epochs 1-{saved} are")
    kept += f" in {out / 'checkpoint.pt'}"
    if saved == epochs:
        log(f"stopped (Ctrl-C) in the end-of-run summary: training had finished ({kept}); "
            f"`python evaluate.py {out}` evaluates it")
    elif saved:
        log(f"stopped (Ctrl-C) in epoch {epoch + 1}: {kept}; the same command with --resume "
            f"continues")
    else:
        log("stopped (Ctrl-C) in epoch 1: no epoch had finished, so there is nothing to resume; "
            "run the command again to start over")
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (repeats dropped)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self):
        self.stream.flush()


def progress(iterable=None, desc="", total=None, unit="it", disable=False, **kwargs):
    """tqdm(iterable, ...) with count, rate and ETA. Not on a terminal: nothing for the first
    LOG_EVERY seconds (short steps stay quiet), then a line every LOG_EVERY seconds and one at
    the end."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable,
                    dynamic_ncols=True, **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable,
                file=_Lines(sys.stderr), ascii=True, ncols=100, mininterval=LOG_EVERY,
                delay=LOG_EVERY, **kwargs)
