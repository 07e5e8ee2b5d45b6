"""The training progress display both backends share: a tqdm bar on a terminal or in a notebook, log lines elsewhere.

A bar on a terminal (as diffusers' scripts show one) with loss, lr and steps/s; in a Jupyter/IPython
kernel (Colab, Kaggle) ``tqdm.auto`` draws its notebook bar, although stderr is no TTY there; in a
log file or CI a bar is noise, so there it is one line per log step. Values arrive only at log
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
        use_bar = enabled and ((self.stream.isatty() or in_notebook()) if bar is None else bar)
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


def in_notebook() -> bool:
    """Whether this process is a Jupyter/IPython kernel (a notebook, Colab, Kaggle, VS Code): an IPython
    shell with a kernel. IPython is only looked up, never imported: a process without it is no kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-initialised or stand-in IPython module: no kernel to draw in
        return False
    return getattr(shell, "kernel", None) is not None
