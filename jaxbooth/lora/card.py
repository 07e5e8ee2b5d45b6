"""README.md of a LoRA output folder: Hub metadata and how to load the adapters (and the merged pipeline)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from jaxbooth.deepfloyd import card_call_arguments
from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from jaxbooth.lora.settings import AdapterSettings
from jaxbooth.output import card_front_matter, training_section


def lora_model_card(*, base_model: str, instance_prompt: str, settings: AdapterSettings,
                    targets: Mapping[str, Sequence[str]], steps: int, backend: str,
                    pipeline_class: str = "StableDiffusionPipeline", kohya: bool = False, merged: bool = False,
                    merged_text_encoder: bool = True, vae: str | None = None,
                    validation_images: Iterable[str] = (), notes: str = "",
                    figures: Mapping[str, float] | None = None) -> str:
    """The card: what was trained, on what, and the lines that load it with stock diffusers.

    ``targets``: per adapted component, the target names that matched its modules. ``notes``: markdown
    after the loading snippet (``deepfloyd.card_notes``: IF's fixed-variance switch, stage II's image).
    ``figures``: ``output.training_figures`` of the run, shown as a table. Tagged ``dora`` too for DoRA (as
    diffusers tags it).
    """
    kinds = ("lora", "dora", "dreambooth") if settings.use_dora else ("lora", "dreambooth")
    front = card_front_matter(pipeline_class=pipeline_class, base_model=base_model, instance_prompt=instance_prompt,
                              kinds=kinds, inference=True)
    kind = "DoRA" if settings.use_dora else "LoRA"
    unet_targets = ", ".join(targets.get("unet", ()))
    if "text_encoder_2" in targets:
        encoder = (f"Both text encoders got adapters too ({', '.join(targets['text_encoder'])}; "
                   f"{', '.join(targets['text_encoder_2'])}).")
    elif "text_encoder" in targets:
        encoder = f"The text encoder got adapters too ({', '.join(targets['text_encoder'])})."
    else:
        encoder = "Only the UNet got adapters; the text encoders are the base model's."
    prompt = json.dumps(instance_prompt)
    files = [f"- `{LORA_WEIGHTS_NAME}`: the adapters in diffusers' format (`load_lora_weights`)."]
    if kohya:
        files.append(f"- `{KOHYA_WEIGHTS_NAME}`: the same adapters in kohya's format, for AUTOMATIC1111 and ComfyUI.")
    vae_line = ""
    if vae:
        vae_line = (f'\nThe run used the VAE `{vae}`; pass it too: `AutoencoderKL.from_pretrained("{vae}")` '
                    "as `vae=` to `from_pretrained`.\n")
    merged_part = ""
    if merged:
        files.append("- `model_index.json`, `unet/`, ...: the base pipeline with the adapters merged in.")
        encoder_note = "" if merged_text_encoder else (
            "\nIts text encoder was not saved (skip_save_text_encoder): pass the base model's as `text_encoder=`; "
            "the merged folder then lacks the text encoder's adapters, which the LoRA file keeps.\n")
        merged_part = f"""
This folder also loads as a plain pipeline, adapters already merged (no peft needed):

```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("path/to/this/folder")
```
{encoder_note}"""
    images = "\n".join(f"![sample]({name})" for name in validation_images)
    notes = f"\n{notes}\n" if notes else ""
    return f"""{front}
# {kind} DreamBooth - {Path(str(base_model)).name or base_model}

{kind} adapters trained with [jaxbooth](https://pypi.org/project/jaxbooth/) ({backend} backend) on
`{base_model}` for {steps} optimizer steps on the instance prompt `{instance_prompt}`.
Rank {settings.rank}, alpha {settings.alpha:g} (scale {settings.scale:g}){", DoRA" if settings.use_dora else ""}, \
UNet targets {unet_targets}. {encoder}

{chr(10).join(files)}

```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("{base_model}")
pipe.load_lora_weights("path/to/this/folder")
image = pipe({prompt}{card_call_arguments(pipeline_class)}, num_inference_steps=50, guidance_scale=7.5).images[0]
```
{notes}{vae_line}{merged_part}{training_section(figures)}
{images}
"""
