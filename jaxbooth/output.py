"""The output folder both backends write: a diffusers pipeline plus the run's records.

Framework-free (stdlib, yaml, json; never jax or torch): the backends write their trained
components (``components_to_save``: ``unet/``, ``text_encoder/``) in diffusers' PyTorch layout,
then ``write_pipeline`` copies the untouched components from the base pipeline (and the VAE
override's ``vae/``), writes ``model_index.json``, the model card and the resolved run spec.
The metric record both backends log (``metric_record``), ``metrics.jsonl``, the training figures
model cards take from it, and the entry to the Hub push (``hub_push``) live here too. Nothing is
downloaded at save time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

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
    ``validation_images``: paths relative to ``out_dir`` shown in the model card. With ``save_single_file`` the
    folder also gets ``<name>.safetensors`` in the original SD layout (``single_file.write_for_run``). Returns
    ``out_dir``.
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
    if getattr(spec.optim, "zero_terminal_snr", False):  # sample as trained: rescaled betas, trailing timesteps
        from jaxbooth.loss_options import save_zero_terminal_snr_scheduler

        save_zero_terminal_snr_scheduler(out_dir / "scheduler")
    write_model_index(base_dir, out_dir, without=dropped)
    single = getattr(spec.checkpointing, "save_single_file", False)
    notes = deepfloyd.card_notes(base_dir=base_dir, lora=False, text_encoder_saved=not skip_text_encoder)
    if single:
        notes = "\n\n".join(filter(None, [notes, single_file_note(out_dir, spec.checkpointing.save_precision)]))
    atomic_write_text(out_dir / "README.md", model_card(
        base_model=spec.model.pretrained_model_name_or_path or str(base_dir), instance_prompt=instance_prompt,
        train_text_encoder=spec.model.train_text_encoder, steps=steps, backend=backend,
        validation_images=validation_images, text_encoder_saved=not skip_text_encoder,
        pipeline_class=card_pipeline_class(base_dir), text_encoder_class=deepfloyd.text_encoder_class_name(base_dir),
        notes=notes, figures=training_figures(out_dir)))
    spec_lib.write_resolved_spec(spec, out_dir / SPEC_FILENAME)
    if single:  # last: it reads the complete folder (a component it lacks is the base's)
        from jaxbooth import single_file

        single_file.write_for_run(out_dir, base_dir=base_dir, spec=spec, steps=steps)
    return out_dir


def single_file_note(out_dir: Path, precision: str | None) -> str:
    """The card's line on the ``--save_single_file`` checkpoint beside the pipeline."""
    from jaxbooth import single_file

    return (f"`{single_file.run_file_name(out_dir)}` is the same model as one file in the original Stable Diffusion "
            f"layout ({precision or single_file.DEFAULT_PRECISION}), for AUTOMATIC1111 and ComfyUI (put it in their "
            "checkpoints folder) or `from_single_file` in diffusers.")


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


# The family tags diffusers' DreamBooth scripts write (train_dreambooth.py: stable-diffusion / if; the SDXL LoRA
# script: stable-diffusion-xl), plus a short ``sdxl``; a pipeline class not listed gets none.
FAMILY_TAGS = {"StableDiffusionPipeline": ("stable-diffusion", "stable-diffusion-diffusers"),
               "StableDiffusionXLPipeline": ("sdxl", "stable-diffusion-xl", "stable-diffusion-xl-diffusers")}


def card_tags(pipeline_class: str, *kinds: str) -> list[str]:
    """The Hub tags of a card: text-to-image, the run's ``kinds`` (dreambooth, lora), diffusers, the base family's
    tags (``FAMILY_TAGS``; IF's ``if``/``if-diffusers``) and jaxbooth."""
    if pipeline_class in deepfloyd.PIPELINE_STAGES:
        family: tuple[str, ...] = deepfloyd.CARD_TAGS
    else:
        family = FAMILY_TAGS.get(pipeline_class, ())
    return ["text-to-image", *kinds, "diffusers", *family, "jaxbooth"]


_CACHED_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def card_base_model(name: str) -> str | None:
    """The base model as the Hub's card metadata takes it: a repo id, or None for a local folder.

    The Hub refuses a commit whose README.md ``base_model`` is not a model id (a local path fails the push), so a
    local base stays in the card's text only; a folder of the Hub cache (``models--owner--name/snapshots/...``)
    is named by its repo id. A name is a Hub id as the loaders take it: no such local path, ``owner/name`` form.
    """
    from jaxbooth.hub import looks_like_hub_id

    cached = _CACHED_SNAPSHOT.search(str(name).replace(os.sep, "/"))
    if cached:
        return cached.group("repo").replace("--", "/")
    if Path(name).expanduser().exists() or not looks_like_hub_id(str(name)):
        return None
    return str(name)


def card_front_matter(*, pipeline_class: str, base_model: str, instance_prompt: str, kinds: Iterable[str],
                      **extra: Any) -> str:
    """The card's YAML header (dumped, so any prompt is valid YAML): licence, Hub base model, prompt, tags."""
    meta: dict[str, Any] = {"license": card_license(pipeline_class)}
    hub_base = card_base_model(base_model)
    if hub_base is not None:
        meta["base_model"] = hub_base
    meta.update({"instance_prompt": instance_prompt, "tags": card_tags(pipeline_class, *kinds),
                 "library_name": "diffusers", **extra})
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n"


def training_figures(out_dir: Path) -> dict[str, float] | None:
    """What a card reports of training, read from ``out_dir/metrics.jsonl`` (both backends log to it through
    ``MetricsLog``): the last logged step and its loss, the training loop's seconds and its mean steps per second.

    A record covers the steps since the previous one in ``steps / perf/steps_per_sec`` wall seconds of the loop
    (validation and checkpoint saves in between included). A record whose step is not past the previous one starts
    a resumed run, whose first window is counted from the last earlier logged step below it. None without a record
    (metrics off, or nothing logged).
    """
    try:
        lines = (Path(out_dir) / METRICS_FILENAME).read_text().splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a half-written last line of a killed run
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "train/loss" in record:
            records.append(record)
    if not records:
        return None
    seconds, steps, previous, logged = 0.0, 0, 0, []
    for record in records:
        step = record["step"]
        if step <= previous:
            previous = max((earlier for earlier in logged if earlier < step), default=0)
        rate = float(record.get("perf/steps_per_sec", 0.0))
        if rate > 0 and math.isfinite(rate):
            seconds += (step - previous) / rate
            steps += step - previous
        logged.append(step)
        previous = step
    return {"step": records[-1]["step"], "final_loss": float(records[-1]["train/loss"]),
            "steps_per_sec": steps / seconds if seconds > 0 else math.nan, "train_seconds": seconds}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def training_section(figures: Mapping[str, float] | None) -> str:
    """The card's "Training figures" table (``training_figures``); empty without figures."""
    if not figures:
        return ""
    rate = figures["steps_per_sec"]
    speed = f"{rate:.3g} optimizer steps/s" if math.isfinite(rate) else "not measured"
    return f"""
## Training figures

| | |
|---|---|
| final loss (step {int(figures["step"])}) | {figures["final_loss"]:.4f} |
| mean speed | {speed} |
| time in the training loop | {_duration(figures["train_seconds"])} |

From `{METRICS_FILENAME}` in this folder (one record per log step: loss, learning rate, gradient norm, speed); the
loop's time counts its steps and what ran between them (validation, checkpoints), not loading or compiling.
"""


def model_card(*, base_model: str, instance_prompt: str, train_text_encoder: bool, steps: int,
               backend: str, validation_images: Iterable[str] = (), text_encoder_saved: bool = True,
               pipeline_class: str = "StableDiffusionPipeline", text_encoder_class: str = "CLIPTextModel",
               notes: str = "", figures: Mapping[str, float] | None = None) -> str:
    """README.md with Hub metadata, in the spirit of diffusers' DreamBooth model cards.

    ``text_encoder_class``: the transformers class the snippet loads the base's text encoder with when it
    was not saved (``T5EncoderModel`` for IF); ``notes``: markdown after the snippet (``deepfloyd.card_notes``);
    ``figures``: ``training_figures`` of the run, shown as a table.
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
    front = card_front_matter(pipeline_class=pipeline_class, base_model=base_model, instance_prompt=instance_prompt,
                              kinds=("dreambooth",))
    call = deepfloyd.card_call_arguments(pipeline_class)
    notes = f"\n{notes}\n" if notes else ""
    return f"""{front}
# DreamBooth - {Path(str(base_model)).name or base_model}

Fine-tuned with [jaxbooth](https://pypi.org/project/jaxbooth/) ({backend} backend) from `{base_model}`
for {steps} optimizer steps on the instance prompt `{instance_prompt}`.
{encoder}

```python
{imports}
{load}
image = pipe("{instance_prompt}"{call}, num_inference_steps=50, guidance_scale=7.5).images[0]
```
{notes}{training_section(figures)}
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
    """Upload the output folder to the Hub (``hub_push.push_folder``); returns the repo id."""
    from jaxbooth import hub_push

    return hub_push.push_folder(Path(out_dir), repo_id=repo_id, token=token)
