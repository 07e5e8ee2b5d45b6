"""The shared progress display: a bar with loss and lr on a terminal, parseable lines elsewhere."""

from __future__ import annotations

import io
import re

from jaxbooth.progress import TrainingProgress


def test_bar_shows_steps_loss_and_lr() -> None:
    stream = io.StringIO()
    progress = TrainingProgress(8, 2, stream=stream, bar=True)
    for _ in range(3):
        progress.advance()
    progress.show(5, 0.1234, 5e-6, 2.0)
    progress.message("checkpoint saved")
    progress.close()
    text = stream.getvalue()
    assert "5/8" in text and "loss=0.1234" in text and "lr=5.00e-06" in text and "step/s" in text
    assert "[jaxbooth] checkpoint saved" in text


def test_lines_without_a_terminal_keep_the_log_format() -> None:
    stream = io.StringIO()  # not a TTY: no bar
    progress = TrainingProgress(8, stream=stream)
    progress.advance()
    progress.show(1, 0.5, 1e-4, 3.25)
    progress.close()
    assert re.fullmatch(r"\[jaxbooth\] step 1/8  loss 0\.5000  lr 1\.00e-04  3\.25 steps/s\n", stream.getvalue())


def test_disabled_on_other_processes_prints_nothing() -> None:
    stream = io.StringIO()
    progress = TrainingProgress(8, stream=stream, enabled=False, bar=True)
    progress.advance()
    progress.show(1, 0.5, 1e-4, 3.0)
    progress.message("x")
    progress.close()
    assert stream.getvalue() == ""
