"""kohya-style sample prompt files: parse, schedule, and write the sampled images (both backends).

A ``--sample_prompts`` file is what kohya sd-scripts' trainers read: one prompt per line (blank lines and
lines starting with ``#`` skipped), each followed by its own options, ``a photo of sks dog --n blurry --w 512
--h 768 --s 30 --l 7.5 --d 42``:

* ``--n`` negative prompt, ``--w`` / ``--h`` width and height (multiples of 8), ``--s`` steps (1-1000),
  ``--l`` guidance (CFG) scale, ``--d`` seed, ``--ss`` sampler (kohya's names that both backends have:
  ddim, ddpm, pndm, euler / k_euler, dpmsolver++, or those diffusers class names).
* kohya's flow-model options (``--g``, ``--ctr``, ``--rcfg``, ``--fs``) have no meaning for a Stable
  Diffusion sampler (kohya's SD trainers ignore them too): a warning says they are ignored. ``--cn``
  (a ControlNet image) is refused, as is any other option (kohya ignores unknown ones silently; a typo would
  then change nothing without a word).

kohya's ``.toml`` (a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` entries) and ``.json`` (a
list of lines or of tables) forms are read too, with kohya's keys (prompt, negative_prompt, width, height,
sample_steps, scale, seed, sample_sampler). Every problem is a ``JaxboothError`` naming the file, the line
(or entry) and the fix, raised when the file is read: before any model loads.

Defaults where a prompt gives none: the run's ``resolution`` for both sides (kohya: 512), the validation
step count (25, diffusers' log_validation; kohya: 30), guidance 7.5 (both), the run's validation_scheduler,
and a seed derived from the run seed and the prompt's index (kohya draws a random one), so a run's samples
are comparable across steps and reproducible. A ``--d`` seed fixes the noise: the same seed and settings give
the same image at the same step (within a backend: the two backends' samplers draw noise differently).

Cadence (kohya): ``sample_every_n_epochs`` wins over ``sample_every_n_steps``; every n optimizer steps,
or after epochs n, 2n, ... Files: ``OUTPUT_DIR/samples/step-000100.png`` (a grid, one cell per prompt,
each cell the size of the largest sample) and ``samples/step-000100/00.png`` (prompt 0 alone); TensorBoard
gets the grid under the tag ``samples``. Framework-free (numpy and PIL; never jax or torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import log as jaxbooth_log
from jaxbooth.config_syntax import toml_module
from jaxbooth.errors import JaxboothError

SAMPLES_DIR = "samples"
TENSORBOARD_TAG = "samples"
DEFAULT_STEPS = 25  # validation_files.NUM_INFERENCE_STEPS: diffusers' log_validation
DEFAULT_GUIDANCE = 7.5  # kohya's and StableDiffusionPipeline's default
SIZE_MULTIPLE = 8  # the VAE's downsampling (kohya rounds down to it; here it is an error)
MAX_STEPS = 1000  # kohya clamps --s to 1..1000
# kohya's --ss names (and the diffusers class names) that both backends sample with
SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
            "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
            "dpmsolver++": "DPMSolverMultistepScheduler"}
_CLASS_NAMES = {name.lower(): name for name in SAMPLERS.values()}
# kohya's options for flow models (FLUX, SD3, Lumina) that a Stable Diffusion sampler never reads
_FLOW_ONLY = {"g": "distilled guidance", "ctr": "CFG truncation", "rcfg": "CFG renormalisation", "fs": "flow shift"}
_OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps", "l": "guidance scale",
            "d": "seed", "ss": "sampler"}
# kohya's table keys (.toml / .json) -> line options
_TABLE_KEYS = {"negative_prompt": "n", "width": "w", "height": "h", "sample_steps": "s", "scale": "l",
               "seed": "d", "sample_sampler": "ss", "guidance_scale": "g", "controlnet_image": "cn",
               "cfg_trunc_ratio": "ctr", "renorm_cfg": "rcfg", "flow_shift": "fs"}


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """One prompt of the file with every setting resolved; ``source`` says where it was written."""

    prompt: str
    negative: str | None  # None: the pipeline's own unconditional input (empty prompt; SDXL: zeros)
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    sampler: str | None  # a diffusers scheduler class name; None: the run's validation_scheduler
    source: str


def derived_seed(run_seed: int, index: int) -> int:
    """The seed of prompt ``index`` without ``--d``: a mix of the run seed and the index (numpy's
    SeedSequence), so prompts get unrelated noise and a run reproduces its samples."""
    return int(np.random.SeedSequence([int(run_seed) % 2**32, index]).generate_state(1)[0])


def _int(value: str, where: str, option: str, low: int, high: int, fix: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise JaxboothError(f"{where}: --{option} {value!r} is not a whole number; {fix}") from None
    if not low <= number <= high:
        raise JaxboothError(f"{where}: --{option} {number} is out of range; {fix}")
    return number


def _size(value: str, where: str, option: str) -> int:
    size = _int(value, where, option, SIZE_MULTIPLE, 16384, f"give a multiple of {SIZE_MULTIPLE} such as 512")
    if size % SIZE_MULTIPLE:
        low = size // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise JaxboothError(f"{where}: --{option} {size} is not a multiple of {SIZE_MULTIPLE} (the VAE downsamples "
                            f"by {SIZE_MULTIPLE}); use {low or SIZE_MULTIPLE} or {low + SIZE_MULTIPLE}")
    return size


def _sampler(value: str, where: str) -> str:
    name = SAMPLERS.get(value.lower()) or _CLASS_NAMES.get(value.lower())
    if name is None:
        known = sorted(SAMPLERS) + sorted(set(SAMPLERS.values()))
        close = difflib.get_close_matches(value, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise JaxboothError(f"{where}: --ss {value!r} is not a sampler both backends have{hint}; use one of "
                            + ", ".join(known))
    return name


def _settings(prompt: str, options: Sequence[tuple[str, str]], where: str, *, index: int, resolution: int,
              seed: int, steps: int, guidance: float) -> SamplePrompt:
    """A SamplePrompt from the prompt and its (option, value) pairs, each checked."""
    if not prompt.strip():
        raise JaxboothError(f"{where}: no prompt before the options; write the prompt first, e.g. "
                            "'a photo of sks dog --w 512'")
    seen: dict[str, str] = {}
    for option, value in options:
        if option in seen:
            raise JaxboothError(f"{where}: --{option} is given twice; keep one")
        if option in _FLOW_ONLY:
            jaxbooth_log.warning(f"{where}: --{option} ({_FLOW_ONLY[option]}) is a kohya option for flow models; "
                                 "a Stable Diffusion sampler has no such setting, so it is ignored")
            continue
        if option == "cn":
            raise JaxboothError(f"{where}: --cn (a ControlNet image) is not supported: jaxbooth samples without "
                                "ControlNet; drop the option")
        if option not in _OPTIONS:
            close = difflib.get_close_matches(option, list(_OPTIONS), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise JaxboothError(f"{where}: unknown option --{option}{hint}; the options are "
                                + ", ".join(f"--{k} ({v})" for k, v in _OPTIONS.items()))
        if value == "":
            raise JaxboothError(f"{where}: --{option} has no value; write it as --{option} VALUE")
        seen[option] = value
    guidance_value = guidance
    if "l" in seen:
        try:
            guidance_value = float(seen["l"])
        except ValueError:
            raise JaxboothError(f"{where}: --l {seen['l']!r} is not a number; give a guidance scale such as 7.5") \
                from None
        if not np.isfinite(guidance_value) or guidance_value < 0:
            raise JaxboothError(f"{where}: --l {seen['l']} must be a number >= 0 (1 or less: no guidance)")
    return SamplePrompt(
        prompt=prompt.strip(), negative=seen.get("n"),
        width=_size(seen["w"], where, "w") if "w" in seen else resolution,
        height=_size(seen["h"], where, "h") if "h" in seen else resolution,
        steps=_int(seen["s"], where, "s", 1, MAX_STEPS, f"give 1 to {MAX_STEPS}") if "s" in seen else steps,
        guidance=guidance_value,
        seed=_int(seen["d"], where, "d", 0, 2**32 - 1, "give a seed from 0 to 2**32 - 1") if "d" in seen
        else derived_seed(seed, index),
        sampler=_sampler(seen["ss"], where) if "ss" in seen else None, source=where)


def parse_line(line: str) -> tuple[str, list[tuple[str, str]]]:
    """kohya's split: the prompt, then (option, value) pairs, each option starting at ' --' (option
    names case-insensitive; a value runs to the next ' --')."""
    prompt, *parts = (" " + line.strip()).split(" --")  # a line opening with an option has no prompt
    options = []
    for part in parts:
        name, _, value = part.strip().partition(" ")
        options.append((name.lower(), value.strip()))
    return prompt, options


def _table_options(entry: Mapping[str, Any], where: str) -> tuple[str, list[tuple[str, str]]]:
    """A .toml / .json table in kohya's keys as (prompt, options)."""
    unknown = [key for key in entry if key != "prompt" and key not in _TABLE_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["prompt", *_TABLE_KEYS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise JaxboothError(f"{where}: unknown key {unknown[0]!r}{hint}; the keys are prompt, "
                            + ", ".join(_TABLE_KEYS))
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise JaxboothError(f"{where}: needs a 'prompt' string, got {prompt!r}")
    return prompt, [(_TABLE_KEYS[key], str(value)) for key, value in entry.items() if key != "prompt"]


def _entries(path: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(where, prompt, options) of each prompt in the file, by its format."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        toml = toml_module(path, "write the prompts one per line in a .txt file")
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as error:
            raise JaxboothError(f"{path}: not valid TOML ({error}); see kohya's [prompt] / [[prompt.subset]] form") \
                from None
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise JaxboothError(f"{path}: a TOML prompt file needs a [prompt] table with [[prompt.subset]] entries "
                                "(kohya's form)")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [(f"{path}: [[prompt.subset]] #{k + 1}", *_table_options({**defaults, **entry}, f"{path}: "
                 f"[[prompt.subset]] #{k + 1}")) for k, entry in enumerate(table["subset"])]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise JaxboothError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, list):
            raise JaxboothError(f"{path}: a JSON prompt file is a list of prompt lines or of tables (kohya's form)")
        out = []
        for k, entry in enumerate(data):
            where = f"{path}: entry {k}"
            if isinstance(entry, str):
                out.append((where, *parse_line(entry)))
            elif isinstance(entry, dict):
                out.append((where, *_table_options(entry, where)))
            else:
                raise JaxboothError(f"{where}: expected a prompt line or a table, got {entry!r}")
        return out
    return [(f"{path}:{number}", *parse_line(line)) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_sample_prompts(path: str | os.PathLike, *, resolution: int, seed: int = 0, steps: int = DEFAULT_STEPS,
                        guidance: float = DEFAULT_GUIDANCE) -> list[SamplePrompt]:
    """Every prompt of a sample prompt file with its settings (defaults: the keyword arguments, see the
    module docstring); ``seed`` is the run's. Raises JaxboothError naming the file and line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise JaxboothError(f"--sample_prompts={os.fspath(path)!r}: no such file; give a text file with one prompt "
                            "per line (kohya's format)")
    prompts = [_settings(prompt, options, where, index=index, resolution=resolution, seed=seed, steps=steps,
                         guidance=guidance)
               for index, (where, prompt, options) in enumerate(_entries(path))]
    if not prompts:
        raise JaxboothError(f"{path}: no prompts (only blank or # lines); add one prompt per line")
    return prompts


def sample_schedule(spec: Any) -> tuple[str, int] | None:
    """("epochs", n) or ("steps", n) for the run's sample prompts, None when it samples none (no file, or
    neither cadence set: kohya samples only then; spec validation warns). Epochs win, as in kohya."""
    v = spec.validation
    if v.sample_prompts is None:
        return None
    if v.sample_every_n_epochs is not None:
        return "epochs", v.sample_every_n_epochs
    if v.sample_every_n_steps is not None:
        return "steps", v.sample_every_n_steps
    return None


def should_sample(schedule: tuple[str, int] | None, step: int, epochs_done: int | None = None) -> bool:
    """Whether to sample after optimizer ``step`` (kohya's cadence: every n steps, or after epochs n, 2n...).
    ``epochs_done``: the number of finished epochs when ``step`` ended one, else None."""
    if schedule is None:
        return False
    kind, every = schedule
    if every < 1:
        raise ValueError(f"sample schedule {schedule!r}: n must be at least 1")
    if kind == "steps":
        return step > 0 and step % every == 0
    if kind == "epochs":
        return epochs_done is not None and epochs_done >= 1 and epochs_done % every == 0
    raise ValueError(f"sample schedule {schedule!r}: expected ('steps' | 'epochs', n)")


def spec_sample_prompts(spec: Any, seed: int = 0) -> list[SamplePrompt]:
    """The run's sample prompts (an empty list when it samples none), with the spec's defaults; call it
    before loading models so a bad file fails first. ``seed``: the run's seed."""
    if sample_schedule(spec) is None:
        return []
    for key in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(spec.validation, key)
        if value is not None and value < 1:
            raise JaxboothError(f"--{key}={value}: must be at least 1")
    return read_sample_prompts(spec.validation.sample_prompts, resolution=spec.data.resolution, seed=seed)


def prompt_texts(prompts: Sequence[SamplePrompt]) -> set[str]:
    """Every text a sampling run encodes (prompts, negatives, and the empty prompt for the default
    negative): what a backend that precomputes embeddings must encode before freeing its encoders."""
    return {p.prompt for p in prompts} | {p.negative if p.negative is not None else "" for p in prompts}


def grid_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / SAMPLES_DIR / f"step-{step:06d}.png"


def image_path(output_dir: str | os.PathLike, step: int, k: int) -> Path:
    return Path(output_dir) / SAMPLES_DIR / f"step-{step:06d}" / f"{k:02d}.png"


def save_samples(images: Sequence[Any], output_dir: str | os.PathLike, step: int) -> Path:
    """Write each prompt's image and the grid (one cell per prompt, padded to the largest); returns the
    grid's path."""
    from jaxbooth import validation_files

    for k, image in enumerate(images):
        validation_files.save_png(image.convert("RGB"), image_path(output_dir, step, k))
    path = grid_path(output_dir, step)
    validation_files.save_png(validation_files.image_grid(images), path)
    return path


def log_samples(writer: Any, grid: Any, step: int) -> None:
    """The grid as one image under ``samples`` (the cells differ in size, so not a batch of them)."""
    writer.add_images(TENSORBOARD_TAG, np.asarray(grid.convert("RGB"))[None], step, dataformats="NHWC")
    if hasattr(writer, "flush"):
        writer.flush()


def describe(prompts: Sequence[SamplePrompt]) -> str:
    """One line for the log: how many prompts and how many distinct (size, steps, sampler, guided or not)
    settings, each a compile of its own on the JAX backend."""
    shapes = {(p.height, p.width, p.steps, p.sampler, p.guidance > 1) for p in prompts}
    return f"{len(prompts)} sample prompt(s), {len(shapes)} distinct size/steps/sampler/guidance setting(s)"
