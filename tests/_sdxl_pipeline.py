"""A tiny random-weight SDXL pipeline built by stock diffusers and transformers (torch), for tests.

The shapes are the peer harness's ``sdxl-tiny`` (../shared/peer-bench/make_tiny_pipe.py): two CLIP
encoders (the second with a projection), ``text_time`` added conditioning, linear projections and
two transformer layers in the inner block. The tokenizer is jaxbooth's tiny byte-level CLIP BPE,
so nothing is downloaded. Built by diffusers itself, so whatever jaxbooth reads from it is what a
user's ``StableDiffusionXLPipeline.save_pretrained`` folder holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RESOLUTION = 64
UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
            in_channels=4, out_channels=4, use_linear_projection=True, addition_embed_type="text_time")
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64, in_channels=3, out_channels=3,
           latent_channels=4, norm_num_groups=32)
CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            max_position_embeddings=77, hidden_act="gelu")
PROJECTION_DIM = 32


def write_sdxl_pipeline(out: Path, seed: int = 0) -> Path:
    """Write the pipeline folder with ``save_pretrained`` of each stock component; returns ``out``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from jaxbooth.text import write_tiny_clip_tokenizer

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    vocab = write_tiny_clip_tokenizer(out / "tokenizer")
    write_tiny_clip_tokenizer(out / "tokenizer_2")
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET).save_pretrained(out / "unet")
    AutoencoderKL(**VAE).save_pretrained(out / "vae")
    special = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    CLIPTextModel(CLIPTextConfig(**CLIP, **special)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=PROJECTION_DIM, **CLIP, **special)).save_pretrained(
        out / "text_encoder_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
