"""Progress on the console: tqdm's bar on a terminal; in a log file or CI, the same status as a plain
line every few seconds, so that a long step is never silent and a log is never a wall of bars."""
import sys

from tqdm import tqdm

LOG_EVERY = 10.0  # seconds between status lines when the output is not a terminal


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
    LOG_EVERY seconds (short steps stay quiet), then a line every LOG_EVERY seconds and one at the end."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=_Lines(sys.stderr), ascii=True,
                ncols=100, mininterval=LOG_EVERY, delay=LOG_EVERY, **kwargs)
