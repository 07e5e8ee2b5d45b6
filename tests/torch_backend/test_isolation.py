"""The torch backend never imports jax, flax, optax, orbax or jaxbooth.jax_backend: checked on a
real run (training, class-image generation, validation, checkpoint, export) and statically."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "orbax", "jaxbooth.jax_backend")

SCRIPT = """
import sys
from jaxbooth.cli import main
code = main(["train", "--backend=torch", "--pretrained_model_name_or_path={model}", "--output_dir={out}",
             "--resolution=64", "--train_batch_size=1", "--max_train_steps=2", "--checkpointing_steps=2",
             "--report_to=none", "--seed=0", "--validation_prompt=a photo of sks toy",
             "--num_validation_images=1", "--validation_steps=2", "--with_prior_preservation",
             "--class_data_dir={out}/class", "--class_prompt=a photo of a toy", "--num_class_images=1",
             "--gradient_checkpointing"])
forbidden = {forbidden!r}
print("LOADED:", sorted(m for m in sys.modules if m in forbidden or m.startswith(tuple(f + "." for f in forbidden))))
sys.exit(code)
"""


def test_a_torch_run_never_loads_jax(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(model=tiny_model_dir, out=out, forbidden=FORBIDDEN)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LOADED: []" in proc.stdout, proc.stdout
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "jaxbooth_checkpoint.json").is_file()
    assert len(list((out / "class").glob("0-*.jpg"))) == 1  # class generation ran jax-free too


def test_torch_backend_modules_import_nothing_from_jax_backend() -> None:
    """Static check of every import statement, lazy ones inside functions included."""
    for path in (REPO / "jaxbooth" / "torch_backend").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = [f for f in FORBIDDEN if name == f or name.startswith(f + ".")]
                assert not top, f"{path.name}:{node.lineno} imports {name}"
