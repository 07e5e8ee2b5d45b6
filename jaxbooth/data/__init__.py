"""Framework-neutral image/prompt pipeline: folders or a Hugging Face dataset -> examples -> numpy batches.

- ``images``: decoding with diffusers' DreamBooth transforms, resize filters, content hashes.
- ``folders``: folder scanning and validation, bundled example folders, caption sidecars.
- ``dataset``: the dataset model (subsets -> examples, with captions, repeats and class
  subsets) and ``dataset_from_spec``, the entry point both backends call.
- ``captions``: per-draw caption transforms (dropout, tag shuffling with kept tokens).
- ``dataset_config``: kohya's ``--dataset_config`` file (TOML / YAML) as subsets and run settings
  (``config_files`` reads such files with the line of every key).
- ``hf_dataset``: ``--dataset_name`` rows as image files (``datasets`` imported lazily).
- ``batches``: the deterministic, resumable, multi-host-aware batch iterator.

Imports only stdlib, numpy and PIL: never jax, torch or transformers (tests enforce this), so
both backends share it. ``from jaxbooth import data; data.X`` reaches every public name.
"""

from jaxbooth.data.batches import BatchIterator, Tokenize
from jaxbooth.data.captions import row_caption
from jaxbooth.data.dataset import (
    Dataset,
    Example,
    Subset,
    dataset_from_spec,
    folder_examples,
    instance_dataset,
    make_dataset,
    make_dreambooth_dataset,
)
from jaxbooth.data.dataset_config import config_dataset, load_dataset_config, spec_overrides
from jaxbooth.data.folders import (
    CAPTION_EXTENSION,
    EXAMPLE_CLASS_PROMPT,
    EXAMPLE_INSTANCE_PROMPT,
    KNOWN_CAPTION_EXTENSIONS,
    SKIP_BAD_HINT,
    example_class_dir,
    example_instance_dir,
    inspect_image,
    read_caption_file,
    scan_image_folder,
)
from jaxbooth.data.hf_dataset import images_cache_dir, load_hf_examples
from jaxbooth.data.images import (
    DEFAULT_INTERPOLATION,
    INTERPOLATION_FILTERS,
    content_hash,
    crop_pixels,
    decode_rgb,
    load_image,
    load_image_with_info,
    load_resized,
    resize_filter,
)

__all__ = [
    "BatchIterator", "Tokenize",
    "Dataset", "Example", "Subset", "dataset_from_spec", "instance_dataset", "folder_examples", "make_dataset",
    "make_dreambooth_dataset", "row_caption", "config_dataset", "load_dataset_config", "spec_overrides",
    "CAPTION_EXTENSION", "KNOWN_CAPTION_EXTENSIONS", "EXAMPLE_CLASS_PROMPT", "EXAMPLE_INSTANCE_PROMPT",
    "SKIP_BAD_HINT", "example_class_dir",
    "example_instance_dir", "inspect_image", "read_caption_file", "scan_image_folder",
    "images_cache_dir", "load_hf_examples",
    "DEFAULT_INTERPOLATION", "INTERPOLATION_FILTERS", "content_hash", "decode_rgb", "load_image",
    "load_image_with_info", "resize_filter", "crop_pixels", "load_resized",
]
