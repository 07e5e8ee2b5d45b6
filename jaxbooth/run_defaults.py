"""What an unset spec key means for a run, decided once for both backends before anything loads.

No model -> the built-in tiny pipeline (at its own resolution unless ``resolution`` was given);
no instance folder and no ``dataset_name`` -> the bundled example images; no seed -> the seed
of the checkpoint being resumed, else a fresh random one. The filled-in values land in the
resolved spec and in every checkpoint, so a relaunch of the same command line resumes exactly
(diffusers draws a new seed on every launch, so its resumed runs differ from uninterrupted ones).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Set
from pathlib import Path

from jaxbooth import log
from jaxbooth.checkpoints import MARKER, find_resume_checkpoint
from jaxbooth.errors import JaxboothError


def recorded_seed(checkpoint: Path) -> int | None:
    """The seed a checkpoint's run used: its marker's ``seed``, else the seed in its resolved spec."""
    try:  # lenient: a damaged marker is the backend's error to report when it resumes
        record = json.loads((checkpoint / MARKER).read_text())
    except (OSError, ValueError):
        return None
    seed = record.get("seed")
    if seed is None:
        seed = (record.get("spec") or {}).get("optim", {}).get("seed")
    return int(seed) if seed is not None else None


def choose_seed(given: int | None, output_dir: str | Path, resume_from: str | None) -> int:
    """The run's seed: the given one, else the resumed checkpoint's, else a fresh random one."""
    checkpoint = find_resume_checkpoint(Path(output_dir).absolute(), resume_from)
    recorded = recorded_seed(checkpoint) if checkpoint is not None else None
    if given is None:
        return recorded if recorded is not None else secrets.randbits(31)
    if recorded is not None and recorded != given:
        log.warning(f"--seed={given} differs from the seed {recorded} of {checkpoint.name}, so the resumed run's data "
                    f"order and noise differ from an uninterrupted run; drop --seed to continue with {recorded}")
    return given


def check_output_dir(output_dir: str | Path, resume_from: str | None) -> None:
    """An output folder that cannot be one, or a named checkpoint that is not there, fails now:
    before class images, model loading and encoding, not after them."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise JaxboothError(f"--output_dir={output_dir}: {out} is a file, not a folder; pass a folder path "
                            "(it is created if missing)")
    find_resume_checkpoint(out, resume_from)  # a name that is not there raises, naming the complete ones


def fill_defaults(spec, given: Set[str] = frozenset()):
    """The spec with its open keys decided (see the module docstring); ``given`` are the keys the
    command line set itself (``spec.given_keys``), so a default is never mistaken for a choice."""
    from jaxbooth import data
    from jaxbooth.spec import replace_flat

    check_output_dir(spec.checkpointing.output_dir, spec.checkpointing.resume_from_checkpoint)
    overrides: dict = {}
    if spec.data.dataset_config is not None:
        pass  # the config file's subsets are the images; its run settings are applied below
    elif spec.data.instance_data_dir is None and spec.data.dataset_name is None:
        overrides["instance_data_dir"] = str(data.example_instance_dir())
        if spec.data.instance_prompt is None:
            overrides["instance_prompt"] = data.EXAMPLE_INSTANCE_PROMPT
    elif spec.data.instance_prompt is None:
        source = "--instance_data_dir" if spec.data.instance_data_dir is not None else "--dataset_name"
        raise JaxboothError(f"--instance_prompt is required with {source}, e.g. --instance_prompt='a photo of sks dog'")
    seed = choose_seed(spec.optim.seed, spec.checkpointing.output_dir, spec.checkpointing.resume_from_checkpoint)
    if seed != spec.optim.seed:
        overrides["seed"] = seed
    if spec.model.pretrained_model_name_or_path is None:
        from jaxbooth.tiny import RESOLUTION, builtin_tiny_model

        overrides["pretrained_model_name_or_path"] = str(builtin_tiny_model())
        note = ""
        if "resolution" not in given:  # 512 px on a model built for 64 would be ~100x the work
            overrides["resolution"] = RESOLUTION["tiny"]
            note = f" at its {RESOLUTION['tiny']} px (--resolution to change)"
        log.info(f"no --pretrained_model_name_or_path: using the built-in tiny model{note} at "
                 f"{overrides['pretrained_model_name_or_path']}")
    overrides.update(data.spec_overrides(spec, given))  # --dataset_config: its resolution, batch size, is_reg
    return replace_flat(spec, **overrides) if overrides else spec
