"""The dataset model: subsets (a folder or a Hugging Face dataset, with a prompt) -> examples.

Owns the subset/example/dataset types, building them from folders, and ``dataset_from_spec``,
the one entry point both backends call: it turns a run spec's data and prior sections into a
:class:`Dataset` (instance images from ``--instance_data_dir`` or ``--dataset_name``, repeated
``--repeats`` times; class images when prior preservation is on; or every subset of a
``--dataset_config`` file, :mod:`jaxbooth.data.dataset_config`). Captions are read once here;
what changes per draw (dropout, tag shuffling) is :mod:`jaxbooth.data.captions`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import log as jaxbooth_log
from jaxbooth.data import captions as captions_lib
from jaxbooth.data.folders import CAPTION_EXTENSION, read_caption_file, scan_image_folder, sidecar_extensions
from jaxbooth.data.images import content_hash
from jaxbooth.errors import JaxboothError


@dataclasses.dataclass(frozen=True)
class Subset:
    """One source of images with how to caption it (the unit kohya/OneTrainer users know).

    `folder` is the images folder, or for a Hugging Face dataset subset its ``--dataset_name``
    (whose examples ``hf_dataset`` loads; such a subset is never scanned as a folder).
    `is_class` marks a regularisation (prior-preservation) subset. `repeats` lists each
    image that many times per epoch. Captions come from `prompt`, or with `use_captions`
    from the first line of a sidecar `<image stem><caption_extension>` file (or the dataset's
    caption column), falling back to `prompt`; `caption_prefix` / `caption_suffix` are joined
    on with a space (kohya). `max_images` keeps the first N sorted images (diffusers'
    `num_class_images`). Per draw (``captions.row_caption``): `caption_dropout_rate`,
    `shuffle_caption` with `keep_tokens` and `caption_separator`. `random_flip`: this subset's random
    horizontal flip (kohya's per-subset ``flip_aug``); None follows the run's ``random_flip``.
    """

    folder: Path
    prompt: str
    is_class: bool = False
    repeats: int = 1
    use_captions: bool = False
    caption_extension: str = CAPTION_EXTENSION
    max_images: int | None = None
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str = ""
    caption_suffix: str = ""
    random_flip: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        role = "class" if self.is_class else "instance"
        if not isinstance(self.prompt, str) or not (self.prompt.strip() or self.use_captions):
            raise JaxboothError(f"{role} subset {self.folder}: the prompt is empty; give a prompt.")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise JaxboothError(
                f"{role} subset {self.folder}: repeats (--repeats)={self.repeats!r}; use an integer >= 1."
            )
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise JaxboothError(
                f"{role} subset {self.folder}: max_images (num_class_images)={self.max_images!r}; "
                "use an integer >= 1."
            )
        if not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)
        rate = self.caption_dropout_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise JaxboothError(f"{role} subset {self.folder}: caption_dropout_rate={rate!r}; use a number in [0, 1].")
        keep = self.keep_tokens
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise JaxboothError(f"{role} subset {self.folder}: keep_tokens={keep!r}; use an integer >= 0.")
        if not isinstance(self.caption_separator, str) or not self.caption_separator:
            raise JaxboothError(f"{role} subset {self.folder}: caption_separator={self.caption_separator!r} is "
                                "empty; use e.g. ',' (the default).")

    @property
    def role(self) -> str:
        return "class" if self.is_class else "instance"

    def decorate(self, caption: str) -> str:
        """`caption` with the subset's prefix and suffix (kohya: joined with a space, before any shuffle)."""
        if self.caption_prefix:
            caption = f"{self.caption_prefix} {caption}"
        if self.caption_suffix:
            caption = f"{caption} {self.caption_suffix}"
        return caption

    def settings(self) -> str:
        """The per-subset options that change training, for the dataset fingerprint."""
        return (f"{self.is_class}|{self.repeats}|{self.caption_dropout_rate}|{self.shuffle_caption}|"
                f"{self.keep_tokens}|{self.caption_separator!r}|{self.random_flip}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image: file, caption, owning subset index, sha1 of the file bytes."""

    path: Path
    caption: str
    subset: int
    content_hash: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Subsets and their examples; instance and class items are example indices with repeats.

    Its length follows diffusers' DreamBoothDataset: max(instance items, class items), where
    instance items list every instance image `repeats` times; item i pairs instance item
    i % n_instance with class item i % n_class.
    """

    subsets: tuple[Subset, ...]
    examples: tuple[Example, ...]

    def __post_init__(self) -> None:
        if not self.instance_items:
            raise JaxboothError("the dataset has no instance images; give at least one instance subset.")

    def _items(self, is_class: bool) -> tuple[int, ...]:
        out: list[int] = []
        for i, ex in enumerate(self.examples):
            if self.subsets[ex.subset].is_class == is_class:
                out.extend([i] * self.subsets[ex.subset].repeats)
        return tuple(out)

    @cached_property
    def instance_items(self) -> tuple[int, ...]:
        return self._items(False)

    @cached_property
    def class_items(self) -> tuple[int, ...]:
        return self._items(True)

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_items)

    def __len__(self) -> int:
        return max(len(self.instance_items), len(self.class_items))

    @cached_property
    def fingerprint(self) -> str:
        """sha1 over examples and subset settings: tells a resumed run whether its data changed."""
        h = hashlib.sha1()
        for ex in self.examples:
            h.update(f"{ex.content_hash}|{ex.caption}|{self.subsets[ex.subset].settings()}\n".encode())
        return h.hexdigest()

    @cached_property
    def captions_vary(self) -> bool:
        """Whether a row's caption can differ between draws (caption dropout or shuffling on a used subset):
        then a frozen text encoder's embeddings cannot all be precomputed from the example captions."""
        used = {ex.subset for ex in self.examples}
        return any(captions_lib.varies(self.subsets[i]) for i in used)

    def possible_captions(self, limit: int = 4096) -> tuple[str, ...] | None:
        """Sorted set of every caption a drawn row can train on (the example captions, "" with dropout,
        every tag order with shuffling), or None when it would exceed `limit` (encode per batch then)."""
        return captions_lib.caption_set(((ex.caption, self.subsets[ex.subset]) for ex in self.examples), limit)

    def row_caption(self, example_index: int, rng: np.random.Generator) -> str:
        """``captions.row_caption`` of one example with its subset's options (see there for the draws)."""
        ex = self.examples[example_index]
        return captions_lib.row_caption(ex.caption, self.subsets[ex.subset], rng)


def folder_examples(subset: Subset, index: int, *, skip_bad: bool = False) -> list[Example]:
    """Scan one folder subset (validating every image) into its examples, captioned."""
    paths = scan_image_folder(
        subset.folder, skip_bad=skip_bad, role=subset.role, caption_extension=subset.caption_extension
    )
    if subset.max_images is not None:
        paths = paths[: subset.max_images]
    examples, missing = [], []
    for p in paths:
        caption = read_caption_file(p, subset.caption_extension) if subset.use_captions else None
        if subset.use_captions and caption is None:
            missing.append(p.name)
        examples.append(Example(p, subset.decorate(caption or subset.prompt), index, content_hash(p)))
    _report_captions(subset, paths, missing)
    return examples


def _report_captions(subset: Subset, paths: list[Path], missing: list[str]) -> None:
    """Images without a caption fall back to the prompt (a warning) or fail without one; caption
    files of another extension beside the images get one line saying how to use them."""
    found = sidecar_extensions(paths)
    if not subset.use_captions:
        if found and not subset.is_class:
            jaxbooth_log.info(f"{subset.folder} has {' and '.join(found)} caption files beside its images, but every "
                              f"image trains on {subset.prompt!r}; set caption_extension (--caption_extension="
                              f"{found[0]}) to train on them")
        return
    found = [ext for ext in found if ext != subset.caption_extension]
    if not missing:
        return
    hint = f" (there are {found[0]} files: caption_extension={found[0]}?)" if found else ""
    if subset.prompt.strip() and subset.is_class and len(missing) == len(paths) and not found:
        return  # class images captioned by their class prompt alone: the usual DreamBooth case
    if subset.prompt.strip():
        jaxbooth_log.warning(
            f"{subset.folder}: {len(missing)} images have no {subset.caption_extension} caption{hint}; "
            f"using the prompt {subset.prompt!r} for them: {', '.join(missing[:10])}")
        return
    raise JaxboothError(
        f"{subset.folder}: {len(missing)} images have no {subset.caption_extension} caption{hint} and the "
        f"subset has no prompt to fall back on ({', '.join(missing[:10])}); add captions or a prompt "
        "(--instance_prompt / --class_prompt, or class_tokens in a dataset config)."
    )


def make_dataset(subsets: Sequence[Subset], *, skip_bad: bool = False) -> Dataset:
    """Scan every subset's folder (validating all images) and build the example list."""
    examples: list[Example] = []
    for index, subset in enumerate(subsets):
        examples.extend(folder_examples(subset, index, skip_bad=skip_bad))
    return Dataset(tuple(subsets), tuple(examples))


def caption_options(data: Any) -> dict[str, Any]:
    """The spec's per-draw caption options (its data section) as :class:`Subset` keywords."""
    return {
        "caption_dropout_rate": float(getattr(data, "caption_dropout_rate", 0.0)),
        "shuffle_caption": bool(getattr(data, "shuffle_caption", False)),
        "keep_tokens": int(getattr(data, "keep_tokens", 0)),
        "caption_separator": getattr(data, "caption_separator", ","),
    }


def _sidecar_options(data: Any) -> dict[str, Any]:
    """``caption_extension`` as :class:`Subset` keywords: None keeps diffusers' one prompt for all."""
    extension = getattr(data, "caption_extension", None)
    return {"use_captions": extension is not None, "caption_extension": extension or CAPTION_EXTENSION}


def _class_subset(
    class_dir: str | Path, class_prompt: str | None, num_class_images: int | None, **options: Any
) -> Subset:
    if not class_prompt:
        raise JaxboothError(
            f"class images folder {class_dir} is given but class_prompt is empty; prior preservation "
            "needs --class_prompt (e.g. 'a photo of a dog')."
        )
    return Subset(Path(class_dir), class_prompt, is_class=True, max_images=num_class_images, **options)


def make_dreambooth_dataset(
    instance_dir: str | Path,
    instance_prompt: str,
    class_dir: str | Path | None = None,
    class_prompt: str | None = None,
    num_class_images: int | None = None,
    skip_bad: bool = False,
    repeats: int = 1,
    **options: Any,
) -> Dataset:
    """diffusers' DreamBooth flags as the one-instance + optional one-class subset case.

    Each instance image appears `repeats` times per epoch (the LoRA scripts' ``--repeats``);
    class images are never repeated. Uses at most `num_class_images` class images (the first
    ones by name, where diffusers takes the first of an unsorted `iterdir()`). Generating
    missing class images is the caller's job (it needs a model); this only reads the disk.
    `options`: :class:`Subset` caption keywords for both subsets (as kohya, class images too).
    """
    subsets = [Subset(Path(instance_dir), instance_prompt, repeats=repeats, **options)]
    if class_dir is not None:
        subsets.append(_class_subset(class_dir, class_prompt, num_class_images, **options))
    return make_dataset(subsets, skip_bad=skip_bad)


def dataset_from_spec(spec: Any, *, instances: Dataset | None = None) -> Dataset:
    """The run's dataset from `spec.data` and `spec.prior`: the one entry point of both backends.

    Instance images come from ``instance_data_dir`` (a folder, every image captioned with
    ``instance_prompt``, or with ``caption_extension`` by its sidecar file) or from the Hugging
    Face dataset ``dataset_name`` (its "train" split, ``image_column``, and per-image captions
    from ``caption_column`` when given), listed ``repeats`` times. Class images (``class_data_dir``,
    ``class_prompt``, at most ``num_class_images``; sidecar captions too with ``caption_extension``)
    are read only when ``with_prior_preservation`` is on; generating the missing ones is the
    backend's job and must happen before this call. With ``dataset_config`` every subset comes
    from that file (its is_reg subsets are the class images, read as they are, never generated).
    ``instances``: what ``instance_dataset(spec)`` already read for this spec, reused instead of
    read again. The spec's caption_dropout_rate / shuffle_caption / keep_tokens / caption_separator
    ride on every subset (a config file may override them per subset).
    """
    if getattr(spec.data, "dataset_config", None) is not None:
        return instances if instances is not None else instance_dataset(spec)
    prior = spec.prior
    class_subset = None
    if prior.with_prior_preservation:
        if prior.class_data_dir is None:
            raise JaxboothError(
                "with_prior_preservation (--with_prior_preservation) needs class_data_dir (--class_data_dir), "
                "the folder of class images."
            )
        class_subset = _class_subset(prior.class_data_dir, prior.class_prompt, prior.num_class_images,
                                     **caption_options(spec.data), **_sidecar_options(spec.data))
    if instances is None:
        instances = instance_dataset(spec)
    if class_subset is None:
        return instances
    class_examples = folder_examples(class_subset, len(instances.subsets), skip_bad=bool(spec.data.skip_bad_images))
    return Dataset((*instances.subsets, class_subset), (*instances.examples, *class_examples))


def instance_dataset(spec: Any) -> Dataset:
    """The instance images alone, read now (folder scan, or the dataset load of ``--dataset_name``),
    so a missing, empty or unreadable source fails before any model loads. Class images are left
    out: they may not exist yet (the backend generates the shortfall); pass the result to
    ``dataset_from_spec(spec, instances=...)`` so the images are not read twice. With
    ``dataset_config``: every subset of the file, class (is_reg) ones included.
    """
    d = spec.data
    if getattr(d, "dataset_config", None) is not None:
        from jaxbooth.data.dataset_config import config_dataset

        return config_dataset(spec)
    skip_bad = bool(d.skip_bad_images)
    dataset_name = getattr(d, "dataset_name", None)
    if dataset_name is None:
        if d.instance_data_dir is None:
            raise JaxboothError(
                "no training images: give instance_data_dir (--instance_data_dir, a folder of images), "
                "dataset_name (--dataset_name, a Hugging Face dataset) or dataset_config (--dataset_config)."
            )
        if not d.instance_prompt:
            raise JaxboothError(
                f"instance_prompt (--instance_prompt) is empty; give the prompt for the images in "
                f"{d.instance_data_dir}, e.g. 'a photo of sks dog'."
            )
        subset = Subset(Path(d.instance_data_dir), d.instance_prompt, repeats=d.repeats,
                        **caption_options(d), **_sidecar_options(d))
        return make_dataset([subset], skip_bad=skip_bad)
    if d.instance_data_dir is not None:
        raise JaxboothError(
            f"both instance_data_dir (--instance_data_dir {d.instance_data_dir}) and dataset_name "
            f"(--dataset_name {dataset_name}) are set; give only one of them (as diffusers requires)."
        )
    if getattr(d, "caption_extension", None) is not None:
        raise JaxboothError(
            f"caption_extension (--caption_extension {d.caption_extension}) reads caption files beside the images "
            f"of a folder; --dataset_name {dataset_name} has its captions in a column: use --caption_column instead."
        )
    if d.caption_column is None and not d.instance_prompt:
        raise JaxboothError(
            f"instance_prompt (--instance_prompt) is empty and no caption_column (--caption_column) is given; "
            f"give the prompt for every image of --dataset_name {dataset_name}, or the column of its captions."
        )
    from jaxbooth.data.hf_dataset import load_hf_examples

    prompt = d.instance_prompt or ""
    instance_subset = Subset(
        Path(dataset_name), prompt, repeats=d.repeats, use_captions=d.caption_column is not None,
        **caption_options(d),
    )
    examples = load_hf_examples(
        dataset_name,
        config_name=d.dataset_config_name,
        image_column=d.image_column,
        caption_column=d.caption_column,
        prompt=prompt,
        cache_dir=d.cache_dir,
        skip_bad=skip_bad,
        subset_index=0,
    )
    return Dataset((instance_subset,), tuple(examples))
