"""Find a model on disk: a local diffusers folder, or a Hub repo in the local cache.

Owns the mapping from ``--pretrained_model_name_or_path`` (plus ``--revision``,
``--variant``) to one directory laid out like a diffusers pipeline. Downloads go
through ``huggingface_hub.snapshot_download``, so the standard cache, ``HF_HOME`` /
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` behave as in diffusers, and only the files the
trainer reads are fetched (configs, tokenizer files and one weight format per
component, never the other variants or the ``.bin`` duplicates).

Framework-free: stdlib, json and huggingface_hub only; never jax or torch, so the CLI
can resolve paths before it picks a backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxbooth.errors import JaxboothError

# The model components a DreamBooth run reads; tokenizers and the schedulers carry no weights. DeepFloyd IF
# adds stage II's image_noising_scheduler and the watermarker its pipelines apply (copied into saved pipelines).
DEFAULT_SUBFOLDERS: tuple[str, ...] = (
    "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
    "image_noising_scheduler", "watermarker",
)
# Weight file stems: diffusers models, transformers models.
WEIGHT_STEMS: tuple[str, ...] = ("diffusion_pytorch_model", "model")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters; a path like ``./x`` or ``/a/b/c`` is not one."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_model_dir(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    subfolders: Sequence[str] | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return the local directory holding the model, downloading what is missing.

    A local directory is used as is (no copy, no validation beyond existence). Anything
    else must be a Hub id ``owner/name``; its snapshot comes from the HF cache, fetched
    when the network allows. ``subfolders`` are the components to fetch (default: the SD /
    SDXL ones; ``""`` means files at the repo root). With ``variant`` (e.g. ``"fp16"``) a
    component without variant files falls back to its plain weights, then to old Flax
    ``*.msgpack`` weights, mirroring diffusers' variant fallback. ``cache_dir``
    (``--cache_dir``) is the HF hub cache to read and fill instead of ``HF_HUB_CACHE``, as
    diffusers' ``from_pretrained(cache_dir=...)``. Every failure is one
    :class:`JaxboothError` that names what was looked for and how to fix it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    name = str(name_or_path)
    if path.exists():
        raise JaxboothError(
            f"{name}: is a file, not a model directory. Pass a diffusers-format folder (with "
            "model_index.json, unet/, vae/, ...) or a Hub id like 'owner/name'. A single-file "
            "checkpoint must be converted first, e.g. with diffusers' "
            "StableDiffusionPipeline.from_single_file(path).save_pretrained(out_dir)."
        )
    if not looks_like_hub_id(name):
        raise JaxboothError(
            f"{name}: no such directory, and it is not a Hugging Face Hub id ('owner/name'). "
            "Fix the path, or pass a Hub repo id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    return _download_snapshot(
        name, revision=revision, variant=variant,
        subfolders=tuple(DEFAULT_SUBFOLDERS if subfolders is None else subfolders),
        token=token, cache_dir=cache_dir,
    )


def resolve_vae_dir(name_or_path: str | Path, **hub: Any) -> Path:
    """The folder of a VAE override (``--pretrained_vae_name_or_path`` /
    ``--pretrained_vae_model_name_or_path``): a pipeline with ``vae/``, or a standalone VAE with
    ``config.json`` at its root, as diffusers' scripts load it (e.g. madebyollin/sdxl-vae-fp16-fix).

    ``hub`` takes ``resolve_model_dir``'s keywords; a Hub repo is fetched for both layouts.
    """
    folder = resolve_model_dir(name_or_path, subfolders=["vae", ""], **hub)
    vae_component_folder(folder)  # either layout, or the error now
    return folder


def vae_component_folder(vae_dir: str | Path) -> Path:
    """The folder holding a VAE override's ``config.json``: ``vae_dir/vae`` (a pipeline) or ``vae_dir``
    itself (a standalone AutoencoderKL); else an error naming both flags. The one place the layout is read."""
    vae_dir = Path(vae_dir)
    for folder in (vae_dir / "vae", vae_dir):
        if (folder / "config.json").is_file():
            return folder
    raise JaxboothError(f"{vae_dir}: the VAE override has neither vae/config.json nor config.json; pass an "
                        "AutoencoderKL folder or repo (or a diffusers pipeline with vae/) as "
                        "--pretrained_vae_name_or_path / --pretrained_vae_model_name_or_path")


def allow_patterns(subfolders: Sequence[str], *, weights: str, variant: str | None = None) -> list[str]:
    """``snapshot_download`` patterns for configs (and sentencepiece tokenizers) plus one weight format of
    ``subfolders``.

    ``weights`` is ``"safetensors"`` (plain or ``variant`` files, sharded or not, named
    as diffusers/transformers ``_add_variant`` names them: ``model.fp16.safetensors``,
    ``model.fp16-00001-of-00002.safetensors``), ``"msgpack"`` (old Flax checkpoints) or
    ``"none"``. Exact stems keep other variants and ``.bin`` duplicates out of the download.
    """
    dot_variant = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for sub in subfolders:
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        patterns += [f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.model"]  # *.model: T5's spiece.model
        if weights == "safetensors":
            for stem in WEIGHT_STEMS:
                patterns += [f"{prefix}{stem}{dot_variant}.safetensors",
                             f"{prefix}{stem}{dot_variant}-*-of-*.safetensors"]
        elif weights == "msgpack":
            patterns.append(f"{prefix}*.msgpack")
        elif weights != "none":
            raise ValueError(f"weights={weights!r} is not one of 'safetensors', 'msgpack', 'none'")
    return patterns


def has_weights(folder: Path, variant: str | None = None, *, include_msgpack: bool = False) -> bool:
    """Whether ``folder`` holds safetensors weights (of ``variant``) or, optionally, msgpack ones."""
    if not folder.is_dir():
        return False
    dot_variant = f".{variant}" if variant else ""
    for stem in WEIGHT_STEMS:
        if (folder / f"{stem}{dot_variant}.safetensors").is_file():
            return True
        if (folder / f"{stem}.safetensors.index{dot_variant}.json").is_file():
            return True
    return include_msgpack and any(folder.glob("*.msgpack"))


def _download_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    variant: str | None,
    subfolders: tuple[str, ...],
    token: str | bool | None,
    cache_dir: str | Path | None,
) -> Path:
    """Fetch in passes: wanted weights first, then fallbacks only for components still lacking them.

    Separate passes are how "variant if present, else plain" is expressed with allow
    patterns without downloading both; offline each pass only re-reads the cache.
    """
    passes: list[tuple[str, str | None, bool]] = [("safetensors", variant, False)]
    if variant:
        passes.append(("safetensors", None, False))
    passes.append(("msgpack", None, True))
    snapshot: Path | None = None
    todo = subfolders
    for weights, pass_variant, include_msgpack in passes:
        patterns = allow_patterns(todo, weights=weights, variant=pass_variant)
        snapshot = _snapshot(repo_id, revision=revision, patterns=patterns, token=token, cache_dir=cache_dir)
        todo = tuple(
            sub for sub in todo
            if (snapshot / sub / "config.json").is_file()
            and not has_weights(snapshot / sub, pass_variant, include_msgpack=include_msgpack)
            and not has_weights(snapshot / sub, variant)
        )
        if not todo:
            break
    assert snapshot is not None
    return snapshot


def _snapshot(
    repo_id: str, *, revision: str | None, patterns: list[str], token: str | bool | None,
    cache_dir: str | Path | None,
) -> Path:
    """One ``snapshot_download`` call, with every Hub/cache failure turned into one JaxboothError."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown_revision = revision or "main"
    where = f"Hub repo '{repo_id}' (revision '{shown_revision}')"
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir,
        )
    except GatedRepoError as error:
        raise JaxboothError(
            f"{where} is gated: {_first_line(error)}. Fix: accept its license on "
            f"https://huggingface.co/{repo_id}, then log in (`hf auth login`) or pass a token."
        ) from error
    except RepositoryNotFoundError as error:
        raise JaxboothError(
            f"{where} was not found on the Hub (or is private). Fix: check the spelling, log in "
            "(`hf auth login`) / pass a token for a private repo, or pass a local directory."
        ) from error
    except RevisionNotFoundError as error:
        raise JaxboothError(
            f"{where}: the repo exists but has no revision '{shown_revision}'. Fix: pass an existing "
            "branch, tag or commit as --revision."
        ) from error
    except (LocalEntryNotFoundError, OSError) as error:
        offline = " HF_HUB_OFFLINE is set, so the Hub was not contacted." if constants.HF_HUB_OFFLINE else ""
        raise JaxboothError(
            f"{where} is not in the local cache {cache} (no local directory of that name either), "
            f"and it could not be downloaded.{offline}\n  cause: {_first_line(error)}\n"
            f"Fix: on a machine with network run `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` and copy the cache over; point HF_HOME / HF_HUB_CACHE (or --cache_dir) at a cache "
            "that has it; or pass the path of a local diffusers folder instead."
        ) from error
    return Path(folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
