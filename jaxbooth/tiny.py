"""Random-weight Stable-Diffusion-shaped pipelines in diffusers format, built offline.

``tiny`` is test-sized; ``small`` is compute-bound on a CPU (benchmarks). Both have the
shapes of the peer harness's pipelines (../shared/peer-bench/make_tiny_pipe.py), so
benchmarks compare like with like. Weights come from jaxbooth's own Flax initialisers
and are exported through the same diffusers-layout writer the trainer uses, so building
one needs no torch (the DeepFloyd IF families, torch-only like training IF, are
built by ``jaxbooth.tiny_if`` with stock classes). With no ``pretrained_model_name_or_path`` the trainer uses the
``tiny`` pipeline from the user cache (built on first use).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from jaxbooth.errors import JaxboothError

SIZES = ("tiny", "small")
_FORMAT_VERSION = 1  # bump when a config below changes, so cached copies are rebuilt

_UNET = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=2, sample_size=32,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
                 attention_head_dim=8),
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, sample_size=32,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                  cross_attention_dim=128, attention_head_dim=8),
}
_VAE = {
    "tiny": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64),
    "small": dict(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, sample_size=128),
}
_CLIP = {
    "tiny": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5),
    "small": dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4),
}
RESOLUTION = {"tiny": 64, "small": 128}
FAMILIES = ("sd", "sdxl", "if-stage1", "if-stage2")  # if-*: jaxbooth.tiny_if (torch)

# SDXL shapes (the peer harness's sdxl-tiny / sdxl-small): cross_attention_dim is both encoders' hidden
# sizes concatenated; the added embedding takes 6 time ids x addition_time_embed_dim plus the second
# encoder's pooled projection (projection_dim = its hidden size here).
_SDXL_UNET = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=2, sample_size=32,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
                 transformer_layers_per_block=[1, 2], addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64),
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, sample_size=32,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 2],
                  addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128,
                  cross_attention_dim=256),
}


def unet_config(size: str) -> dict:
    """A complete diffusers ``UNet2DConditionModel`` config.json for ``size``."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
        "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
        "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "transformer_layers_per_block": 1,
        "use_linear_projection": False, "upcast_attention": False, "class_embed_type": None,
        "addition_embed_type": None, "num_attention_heads": None, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
        **_UNET[size],
    }


def vae_config(size: str) -> dict:
    """A complete diffusers ``AutoencoderKL`` config.json for ``size``."""
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "in_channels": 3,
        "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "act_fn": "silu",
        "norm_num_groups": 32, "scaling_factor": 0.18215, "force_upcast": True,
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        **_VAE[size],
    }


def clip_config(size: str, vocab_size: int) -> dict:
    """A transformers ``CLIPTextConfig`` config.json; special ids are the tokenizer's."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab_size,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "projection_dim": 512, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1, "torch_dtype": "float32", **_CLIP[size],
    }


def sdxl_unet_config(size: str) -> dict:
    """A complete diffusers SDXL ``UNet2DConditionModel`` config.json (``text_time`` added embedding)."""
    return {**unet_config(size), "use_linear_projection": True, "addition_embed_type": "text_time",
            **_SDXL_UNET[size]}


def sdxl_clip_configs(size: str, vocab_size: int) -> tuple[dict, dict]:
    """Both SDXL text encoders' configs: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``."""
    base = {**clip_config(size, vocab_size), "hidden_act": "gelu"}
    projection = {**base, "architectures": ["CLIPTextModelWithProjection"],
                  "projection_dim": _CLIP[size]["hidden_size"]}
    return base, projection


SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "steps_offset": 1, "timestep_spacing": "leading",
}

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
    "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
    "variance_type": "fixed_small", "clip_sample": False, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tiny_pipeline(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, family: str = "sd") -> Path:
    """Write a complete random-weight diffusers pipeline folder (``family`` sd or sdxl); returns its path.

    Written to a temporary sibling and renamed into place, so an interrupted build never
    leaves a half pipeline that later runs would pick up.
    """
    if size not in SIZES:
        raise JaxboothError(f"tiny-model: size {size!r} is not one of {SIZES}")
    if family not in FAMILIES:
        raise JaxboothError(f"tiny-model: family {family!r} is not one of {FAMILIES}")
    if family.startswith("if-"):
        from jaxbooth.tiny_if import write_if_pipeline

        return write_if_pipeline(out_dir, family, size, seed)
    from jaxbooth.jax_backend.tiny_weights import write_random_components  # the one step that needs jax
    from jaxbooth.text import write_tiny_clip_tokenizer

    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        vocab_size = write_tiny_clip_tokenizer(staging / "tokenizer")
        if family == "sdxl":
            write_tiny_clip_tokenizer(staging / "tokenizer_2")
            first, second = sdxl_clip_configs(size, vocab_size)
            configs = {"unet": sdxl_unet_config(size), "vae": vae_config(size), "text_encoder": first,
                       "text_encoder_2": second}
            scheduler, index = SDXL_SCHEDULER_CONFIG, SDXL_MODEL_INDEX
        else:
            configs = {"unet": unet_config(size), "vae": vae_config(size),
                       "text_encoder": clip_config(size, vocab_size)}
            scheduler, index = SCHEDULER_CONFIG, MODEL_INDEX
        write_random_components(staging, configs, seed)
        write_json(staging / "scheduler" / "scheduler_config.json", scheduler)
        write_json(staging / "model_index.json", index)
        write_json(staging / "jaxbooth_tiny.json", {"size": size, "seed": seed, "format": _FORMAT_VERSION,
                                                    "resolution": RESOLUTION[size], "family": family})
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def default_cache_dir() -> Path:
    root = os.environ.get("JAXBOOTH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxbooth")
    return Path(root)


def builtin_tiny_model(size: str = "tiny") -> Path:
    """The built-in tiny pipeline, built into the user cache on first use."""
    path = default_cache_dir() / f"tiny-model-{size}-v{_FORMAT_VERSION}"
    if not (path / "model_index.json").exists():
        write_tiny_pipeline(path, size)
    return path
