"""Resume is exact by default: a run without --seed records the seed it drew, and a relaunch of the
same command line with --resume_from_checkpoint continues with it (diffusers draws a new one).

Both backends: (run 2 steps without --seed, relaunch to 4) == (4 steps straight with --seed=the
seed the first run drew), bit for bit. Also the unit rules of ``run_defaults.choose_seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import yaml

from jaxbooth import run_defaults
from jaxbooth.checkpoints import MARKER
from jaxbooth.cli import main
from tests._logs import logged_warning


def resolved_seed(out: Path) -> int:
    return int(yaml.safe_load((out / "jaxbooth_run.yaml").read_text())["optim"]["seed"])


def unet(out: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def write_marker(path: Path, record: dict) -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps(record))
    return path


def test_choose_seed_reuses_the_checkpoint_seed(tmp_path: Path) -> None:
    write_marker(tmp_path / "checkpoint-3", {"step": 3, "seed": 1234})
    assert run_defaults.choose_seed(None, tmp_path, "latest") == 1234
    assert run_defaults.choose_seed(None, tmp_path, "checkpoint-3") == 1234
    assert run_defaults.choose_seed(None, tmp_path, str(tmp_path / "checkpoint-3")) == 1234


def test_choose_seed_reads_older_markers_from_their_resolved_spec(tmp_path: Path) -> None:
    write_marker(tmp_path / "checkpoint-2", {"step": 2, "spec": {"optim": {"seed": 77}}})
    assert run_defaults.choose_seed(None, tmp_path, "latest") == 77


def test_choose_seed_without_a_checkpoint_draws_a_fresh_one(tmp_path: Path) -> None:
    drawn = {run_defaults.choose_seed(None, tmp_path, "latest") for _ in range(4)}
    assert len(drawn) > 1 and all(0 <= s < 2**31 for s in drawn)
    assert run_defaults.choose_seed(5, tmp_path, None) == 5


def test_a_given_seed_that_differs_is_one_warning_line(tmp_path: Path) -> None:
    write_marker(tmp_path / "checkpoint-3", {"step": 3, "seed": 1234})
    with logged_warning("--seed=9") as messages:
        assert run_defaults.choose_seed(9, tmp_path, "latest") == 9
    assert len(messages) == 1 and "1234" in messages[0] and "\n" not in messages[0]


# jax: slow (three runs, ~85 s on 2 cores); CI keeps the torch case of this shared rule (run_defaults.choose_seed,
# unit-tested above) and JAX's exact resume (test_train.py::test_resume_continues_exactly).
@pytest.mark.parametrize("backend", [pytest.param("jax", marks=pytest.mark.slow),
                                     pytest.param("torch", marks=pytest.mark.requires_torch)])
def test_resume_without_seed_equals_an_uninterrupted_run(backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    common = [f"--pretrained_model_name_or_path={tiny_model_dir}", "--resolution=64", "--train_batch_size=1",
              "--learning_rate=1e-3", "--lr_warmup_steps=0", "--report_to=none", "--checkpointing_steps=2",
              "--random_flip", f"--backend={backend}"]
    interrupted = tmp_path / "interrupted"
    assert main(["train", *common, f"--output_dir={interrupted}", "--max_train_steps=2"]) == 0
    seed = resolved_seed(interrupted)
    assert main(["train", *common, f"--output_dir={interrupted}", "--max_train_steps=4",
                 "--resume_from_checkpoint=latest"]) == 0
    assert resolved_seed(interrupted) == seed
    straight = tmp_path / "straight"
    assert main(["train", *common, f"--output_dir={straight}", "--max_train_steps=4", f"--seed={seed}"]) == 0
    a, b = unet(interrupted), unet(straight)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_a_file_as_output_dir_or_a_missing_checkpoint_fails_before_anything_loads(tmp_path: Path) -> None:
    from jaxbooth.errors import JaxboothError

    (tmp_path / "afile").write_text("")
    with pytest.raises(JaxboothError, match="is a file, not a folder"):
        run_defaults.check_output_dir(tmp_path / "afile", None)
    write_marker(tmp_path / "out" / "checkpoint-2", {"step": 2, "seed": 1})
    with pytest.raises(JaxboothError, match="checkpoint-99.*complete ones in .*checkpoint-2"):
        run_defaults.check_output_dir(tmp_path / "out", "checkpoint-99")
    run_defaults.check_output_dir(tmp_path / "out", "checkpoint-2")
    run_defaults.check_output_dir(tmp_path / "new", "latest")  # nothing yet: a new run, as in diffusers
