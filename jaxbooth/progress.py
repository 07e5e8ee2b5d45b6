"""The training progress display both backends share: a tqdm bar on a terminal, log lines elsewhere.

A bar on a terminal (as diffusers' scripts show one) with loss, lr and steps/s; in a log
file or CI a bar is noise, so there it is one line per log step. Values arrive only at log
steps (the JAX backend reads the device only then); the bar advances every step.
"""

from __future__ import annotations

import sys
from typing import TextIO


class TrainingProgress:
    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 bar: bool | None = None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        use_bar = enabled and (self.stream.isatty() if bar is None else bar)
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc="Steps", file=self.stream,
                            dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, step: int, loss: float, lr: float, steps_per_sec: float) -> None:
        """The values of a log step: on the bar, or as one line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.refresh()
            return
        print(f"[jaxbooth] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {steps_per_sec:.2f} steps/s",
              file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A log line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[jaxbooth] {text}", file=self.stream)
        else:
            print(f"[jaxbooth] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
