"""Helpers of the torch backend tests: run the CLI in-process on the tiny pipeline, read its outputs."""

from __future__ import annotations

import json
from pathlib import Path

TINY_ARGS = ("--backend=torch", "--resolution=64", "--train_batch_size=1", "--learning_rate=1e-4",
             "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--log_every_steps=1")


def run_train(model_dir: Path, out: Path, *extra: str) -> int:
    """``jaxbooth train --backend=torch`` in this process, through the real CLI entry point."""
    from jaxbooth.cli import main

    return main(["train", f"--pretrained_model_name_or_path={model_dir}", f"--output_dir={out}", *TINY_ARGS, *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
