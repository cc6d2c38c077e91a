"""Progress on the main rank: a tqdm bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("apt.train")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, sink=None):
        self.enabled, self.total, self.sink = enabled, total_steps, sink
        self.started, self.start_step = time.perf_counter(), start_step
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        return elapsed / done * (self.total - step) if done else float("nan")

    def line(self, text: str) -> None:
        """A log line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        if self.sink:
            self.sink(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
