"""The shared progress display: a bar with loss and lr on a terminal or in a notebook, parseable lines elsewhere."""

from __future__ import annotations

import io
import re
import sys
import types

import pytest

from jaxbooth.progress import TrainingProgress, in_notebook


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


class RecordingBar:
    """Stands in for ``tqdm.auto.tqdm``: keeps what the display asked of it."""

    made: list[RecordingBar] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.postfix, self.updates = kwargs, None, 0
        RecordingBar.made.append(self)

    def update(self, steps: int) -> None:
        self.updates += steps

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def fake_ipython(monkeypatch: pytest.MonkeyPatch, shell: object) -> None:
    import tqdm.auto  # before IPython is faked: tqdm.autonotebook probes it on import

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.made.clear()

    def get_ipython():
        if shell is RuntimeError:
            raise RuntimeError("half-initialised IPython")
        return shell

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=get_ipython))


def test_a_notebook_kernel_gets_the_tqdm_auto_bar_though_stderr_is_no_tty(monkeypatch) -> None:
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))  # ipykernel's shell (Jupyter, Colab)
    stream = io.StringIO()
    assert in_notebook()
    progress = TrainingProgress(8, 2, stream=stream)
    progress.advance()
    progress.show(3, 0.25, 1e-4, 2.0)
    progress.close()
    [bar] = RecordingBar.made
    assert (bar.kwargs["total"], bar.kwargs["initial"], bar.updates) == (8, 2, 1)
    assert bar.postfix == {"loss": "0.2500", "lr": "1.00e-04"} and stream.getvalue() == ""


@pytest.mark.parametrize("shell", [None, types.SimpleNamespace(), RuntimeError],
                         ids=["no-shell", "terminal-ipython", "get_ipython-fails"])
def test_ipython_without_a_kernel_keeps_the_log_lines(monkeypatch, shell) -> None:
    fake_ipython(monkeypatch, shell)
    stream = io.StringIO()
    assert not in_notebook()
    progress = TrainingProgress(8, stream=stream)
    progress.show(1, 0.5, 1e-4, 3.25)
    assert RecordingBar.made == [] and stream.getvalue().startswith("[jaxbooth] step 1/8")


def test_no_ipython_imported_is_no_notebook(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not in_notebook()
