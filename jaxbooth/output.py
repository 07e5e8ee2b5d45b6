"""The output folder both backends write: a diffusers pipeline plus the run's records.

Framework-free (stdlib, yaml, json): the backends write their trained components
(``unet/``, ``text_encoder/``) in diffusers' PyTorch layout, and this module copies the
untouched components from the base pipeline, writes ``model_index.json``, the resolved
run spec, a model card and metrics, and pushes to the Hub when asked. Nothing is
downloaded at save time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from jaxbooth.errors import JaxboothError

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
SPEC_FILENAME = "jaxbooth_run.yaml"
METRICS_FILENAME = "metrics.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_base_components(base_dir: Path, out_dir: Path, skip: Iterable[str]) -> list[str]:
    """Copy the components training did not change (vae, tokenizer, scheduler, ...) from the base pipeline."""
    skip = set(skip)
    copied = []
    for component in PIPELINE_COMPONENTS:
        source = base_dir / component
        if component in skip or not source.is_dir():
            continue
        target = out_dir / component
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.msgpack", ".*"))
        copied.append(component)
    return copied


def write_model_index(base_dir: Path, out_dir: Path) -> None:
    """The base pipeline's model_index.json, with safety checker and feature extractor dropped.

    jaxbooth never fetches them from the Hub; diffusers loads a pipeline whose index lists
    them as ``[null, null]``.
    """
    source = base_dir / "model_index.json"
    if not source.is_file():
        raise JaxboothError(f"{source}: missing; the base model is not a diffusers pipeline folder")
    index = json.loads(source.read_text())
    for optional in ("safety_checker", "feature_extractor"):
        if optional in index:
            index[optional] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    atomic_write_text(out_dir / "model_index.json", json.dumps(index, indent=2) + "\n")


def model_card(*, base_model: str, instance_prompt: str, train_text_encoder: bool, steps: int,
               backend: str, validation_images: Iterable[str] = ()) -> str:
    """README.md with Hub metadata, in the spirit of diffusers' DreamBooth model cards."""
    images = "\n".join(f"![sample]({name})" for name in validation_images)
    return f"""---
license: creativeml-openrail-m
base_model: {base_model}
instance_prompt: {instance_prompt}
tags:
- text-to-image
- dreambooth
- diffusers
- jaxbooth
library_name: diffusers
---

# DreamBooth - {Path(str(base_model)).name or base_model}

Fine-tuned with [jaxbooth](https://pypi.org/project/jaxbooth/) ({backend} backend) from `{base_model}`
for {steps} optimizer steps on the instance prompt `{instance_prompt}`.
Text encoder trained: {train_text_encoder}.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
image = pipe("{instance_prompt}", num_inference_steps=50, guidance_scale=7.5).images[0]
```

{images}
"""


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``): one record per log step, flushed each time."""

    def __init__(self, out_dir: Path, *, enabled: bool = True):
        self.path = out_dir / METRICS_FILENAME
        self.enabled = enabled
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def push_to_hub(out_dir: Path, *, repo_id: str | None, token: str | None) -> str:
    """Upload the output folder; the repo id defaults to the folder name, as diffusers does."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or out_dir.name
    try:
        repo = create_repo(repo_id, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo, folder_path=str(out_dir), token=token, commit_message="jaxbooth: end of training",
                      ignore_patterns=["step_*", "epoch_*", "checkpoint-*", "*.tmp*"])
    except Exception as error:  # network, auth: the trained model is on disk either way
        raise JaxboothError(f"push_to_hub: uploading {out_dir} to {repo_id!r} failed ({error}); the trained "
                            f"pipeline is saved locally; retry with `huggingface-cli upload {repo_id} {out_dir}`"
                            ) from None
    return repo
