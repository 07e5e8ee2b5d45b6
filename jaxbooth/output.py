"""The output folder both backends write: a diffusers pipeline plus the run's records.

Framework-free (stdlib, yaml, json; never jax or torch): the backends write their trained
components (``components_to_save``: ``unet/``, ``text_encoder/``) in diffusers' PyTorch layout,
then ``write_pipeline`` copies the untouched components from the base pipeline (and the VAE
override's ``vae/``), writes ``model_index.json``, the model card and the resolved run spec.
The metric record both backends log (``metric_record``), ``metrics.jsonl`` and the Hub push
live here too. Nothing is downloaded at save time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jaxbooth import deepfloyd
from jaxbooth.errors import JaxboothError

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2",
                       "image_noising_scheduler", "watermarker")  # the last two: DeepFloyd IF's
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


def write_model_index(base_dir: Path, out_dir: Path, *, without: Iterable[str] = ()) -> None:
    """The base pipeline's model_index.json, with safety checker, feature extractor and the
    components in ``without`` written as ``[null, null]``.

    jaxbooth never fetches a safety checker from the Hub; diffusers loads a pipeline whose index
    lists a component as ``[null, null]`` (and takes it as a keyword to ``from_pretrained``).
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
    for component in without:
        index[component] = [None, None]
    atomic_write_text(out_dir / "model_index.json", json.dumps(index, indent=2) + "\n")


def components_to_save(spec: Any) -> tuple[str, ...]:
    """The components a backend writes itself before ``write_pipeline``: the UNet, and the text
    encoder when it was trained and ``skip_save_text_encoder`` is off (diffusers' rule)."""
    saved = ["unet"]
    if spec.model.train_text_encoder and not spec.checkpointing.skip_save_text_encoder:
        saved.append("text_encoder")
    return tuple(saved)


def _copy_vae_override(vae_dir: Path, out_dir: Path) -> None:
    """``out_dir/vae`` from the override: a pipeline folder holding ``vae/``, or a standalone VAE
    (``config.json`` at its root, e.g. stabilityai/sd-vae-ft-mse)."""
    from jaxbooth.hub import vae_component_folder

    source = vae_component_folder(vae_dir)
    target = out_dir / "vae"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.msgpack", ".*"))


def write_pipeline(out_dir: Path, *, base_dir: Path, trained_components: Iterable[str], vae_dir: Path | None,
                   spec: Any, steps: int, backend: str, instance_prompt: str,
                   validation_images: Iterable[str] = ()) -> Path:
    """Complete ``out_dir`` into a diffusers pipeline once a backend has written ``trained_components``.

    Copies every other component from ``base_dir`` (the VAE from ``vae_dir`` when given), writes
    ``model_index.json``, ``README.md`` and the resolved spec. A scheduler with a learned variance (DeepFloyd
    IF's) is switched to ``fixed_small``: DreamBooth trains only the noise prediction (diffusers' rule). With
    ``skip_save_text_encoder``
    the folder has no ``text_encoder/`` and the index names it ``[null, null]``, as diffusers
    saves it: load it with ``StableDiffusionPipeline.from_pretrained(out, text_encoder=...)``.
    ``validation_images``: paths relative to ``out_dir`` shown in the model card. Returns ``out_dir``.
    """
    from jaxbooth import spec as spec_lib

    out_dir, base_dir = Path(out_dir), Path(base_dir)
    trained = tuple(trained_components)
    skip_text_encoder = spec.checkpointing.skip_save_text_encoder
    if skip_text_encoder and "text_encoder" in trained:
        raise ValueError("trained_components names text_encoder although skip_save_text_encoder is set; "
                         "write only output.components_to_save(spec)")
    missing = [name for name in trained if not (out_dir / name / "config.json").is_file()]
    if missing:
        raise ValueError(f"{out_dir}: the backend has not written {missing} (no config.json) before write_pipeline")
    dropped = {"text_encoder"} if skip_text_encoder else set()
    for name in dropped:  # a previous run into the same folder may have left one
        shutil.rmtree(out_dir / name, ignore_errors=True)
    replaced = set(trained) | dropped | ({"vae"} if vae_dir is not None else set())
    copy_base_components(base_dir, out_dir, skip=replaced)
    if vae_dir is not None:
        _copy_vae_override(Path(vae_dir), out_dir)
    deepfloyd.write_fixed_variance(out_dir / "scheduler")
    write_model_index(base_dir, out_dir, without=dropped)
    atomic_write_text(out_dir / "README.md", model_card(
        base_model=spec.model.pretrained_model_name_or_path or str(base_dir), instance_prompt=instance_prompt,
        train_text_encoder=spec.model.train_text_encoder, steps=steps, backend=backend,
        validation_images=validation_images, text_encoder_saved=not skip_text_encoder,
        pipeline_class=card_pipeline_class(base_dir), text_encoder_class=deepfloyd.text_encoder_class_name(base_dir),
        notes=deepfloyd.card_notes(base_dir=base_dir, lora=False, text_encoder_saved=not skip_text_encoder)))
    spec_lib.write_resolved_spec(spec, out_dir / SPEC_FILENAME)
    return out_dir


def card_pipeline_class(base_dir: Path) -> str:
    """The base pipeline's class for a model card's snippet (``model_index.json``; StableDiffusionPipeline failing
    that)."""
    try:
        name = json.loads((Path(base_dir) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name.endswith("Pipeline") else "StableDiffusionPipeline"


def card_license(pipeline_class: str) -> str:
    """The base family's licence tag: SDXL openrail++ and SD creativeml-openrail-m as diffusers' scripts write
    them; DeepFloyd IF the base checkpoints' own licence (diffusers writes SD's there)."""
    if pipeline_class in deepfloyd.PIPELINE_STAGES:
        return deepfloyd.LICENSE
    return "openrail++" if pipeline_class == "StableDiffusionXLPipeline" else "creativeml-openrail-m"


def card_tags(pipeline_class: str, *kinds: str) -> list[str]:
    """The Hub tags of a card: text-to-image, the run's ``kinds`` (dreambooth, lora), diffusers, jaxbooth, and
    IF's ``if``/``if-diffusers`` for an IF base (as diffusers' scripts tag them)."""
    family = list(deepfloyd.CARD_TAGS) if pipeline_class in deepfloyd.PIPELINE_STAGES else []
    return ["text-to-image", *kinds, "diffusers", *family, "jaxbooth"]


def model_card(*, base_model: str, instance_prompt: str, train_text_encoder: bool, steps: int,
               backend: str, validation_images: Iterable[str] = (), text_encoder_saved: bool = True,
               pipeline_class: str = "StableDiffusionPipeline", text_encoder_class: str = "CLIPTextModel",
               notes: str = "") -> str:
    """README.md with Hub metadata, in the spirit of diffusers' DreamBooth model cards.

    ``text_encoder_class``: the transformers class the snippet loads the base's text encoder with when it
    was not saved (``T5EncoderModel`` for IF); ``notes``: markdown after the snippet (``deepfloyd.card_notes``).
    """
    images = "\n".join(f"![sample]({name})" for name in validation_images)
    if text_encoder_saved:
        load = f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder")'
        encoder = f"Text encoder trained: {train_text_encoder}."
    else:
        load = (f'text_encoder = {text_encoder_class}.from_pretrained("{base_model}", subfolder="text_encoder")\n'
                f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder", text_encoder=text_encoder)')
        encoder = "The text encoder was not saved (skip_save_text_encoder): pass the base model's, as below."
    imports = f"from diffusers import {pipeline_class}" + (
        "" if text_encoder_saved else f"\nfrom transformers import {text_encoder_class}")
    tags = "\n".join(f"- {tag}" for tag in card_tags(pipeline_class, "dreambooth"))
    call = deepfloyd.card_call_arguments(pipeline_class)
    notes = f"\n{notes}\n" if notes else ""
    return f"""---
license: {card_license(pipeline_class)}
base_model: {base_model}
instance_prompt: {instance_prompt}
tags:
{tags}
library_name: diffusers
---

# DreamBooth - {Path(str(base_model)).name or base_model}

Fine-tuned with [jaxbooth](https://pypi.org/project/jaxbooth/) ({backend} backend) from `{base_model}`
for {steps} optimizer steps on the instance prompt `{instance_prompt}`.
{encoder}

```python
{imports}
{load}
image = pipe("{instance_prompt}"{call}, num_inference_steps=50, guidance_scale=7.5).images[0]
```
{notes}
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


STEP_METRICS = ("loss", "instance_loss", "prior_loss", "lr", "grad_norm")
"""What a backend's optimizer step reports, averaged over its accumulation window (and processes)."""
LOSS_METRICS = ("loss", "instance_loss", "prior_loss")


def metric_record(step_metrics: Mapping[str, float], *, steps_per_sec: float) -> dict[str, float]:
    """The record both backends log at a log step, to metrics.jsonl, TensorBoard and wandb alike.

    ``train/loss`` is the optimised loss (instance + prior_loss_weight x prior),
    ``train/instance_loss`` / ``train/prior_loss`` its parts (prior 0 without prior preservation),
    ``train/lr`` the rate the step's update used, ``train/grad_norm`` the global L2 norm of the
    accumulated gradient before clipping, ``perf/steps_per_sec`` optimizer steps per second since
    the previous log step.
    """
    missing = [name for name in STEP_METRICS if name not in step_metrics]
    if missing:
        raise KeyError(f"step metrics lack {missing}: a backend's optimizer step reports {list(STEP_METRICS)}")
    record = {f"train/{name}": float(step_metrics[name]) for name in STEP_METRICS}
    record["perf/steps_per_sec"] = float(steps_per_sec)
    return record


class MetricWindow:
    """The optimizer steps since the previous log step: their rate, and where a NaN may have appeared.

    Values are read back from the device only at log steps, so a non-finite loss is reported as
    "somewhere within steps [a, b]" (big_vision's check). ``clock`` is injectable for tests.
    """

    def __init__(self, start_step: int, clock: Any = time.perf_counter):
        self.first, self._clock = start_step + 1, clock
        self._time = clock()

    def record(self, step: int, step_metrics: Mapping[str, float]) -> dict[str, float]:
        """``metric_record`` of log step ``step``; raises naming the window when a loss is not finite."""
        now = self._clock()
        record = metric_record(step_metrics, steps_per_sec=(step - self.first + 1) / max(now - self._time, 1e-9))
        bad = [name for name in LOSS_METRICS if not math.isfinite(record[f"train/{name}"])]
        if bad:
            raise JaxboothError(f"the loss became nan or inf somewhere within steps [{self.first}, {step}] "
                                f"({', '.join(bad)}); lower --learning_rate, or use --mixed_precision=bf16 "
                                "instead of fp16")
        self.first, self._time = step + 1, now
        return record


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
