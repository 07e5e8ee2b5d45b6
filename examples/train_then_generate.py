"""Fine-tune from Python, then sample the result with the Flax pipeline: jaxbooth's notebook workflow in one file.

    python examples/train_then_generate.py OUT_DIR [--model PIPELINE_DIR] [--resolution PX] [--steps N]

Without --model it trains jaxbooth's built-in tiny random-weight model (built on first use, in seconds), so
it runs on a laptop CPU and the image is noise; pass a real Stable Diffusion folder (and more steps, a GPU or
TPU) for a real result. The bundled example photos (jaxbooth/examples/instance) are the instance images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

import jaxbooth
from jaxbooth import FlaxStableDiffusionPipeline
from jaxbooth.data import EXAMPLE_INSTANCE_PROMPT, example_instance_dir
from jaxbooth.tiny import RESOLUTION, builtin_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the trained pipeline and the image go")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers SD pipeline folder (default: tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 for tiny, else 512")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to train")
    args = parser.parse_args()
    if args.model is None:
        model, default_resolution = builtin_tiny_model(), RESOLUTION["tiny"]  # random weights, built once, cached
    else:
        model, default_resolution = args.model, 512  # diffusers' default

    # 1. DreamBooth: the keys are `jaxbooth train`'s flags (diffusers' names), the values plain Python.
    result = jaxbooth.train(
        pretrained_model_name_or_path=model,
        instance_data_dir=example_instance_dir(),
        instance_prompt=EXAMPLE_INSTANCE_PROMPT,  # "a photo of sks toy"
        output_dir=args.out_dir / "trained",
        resolution=args.resolution or default_resolution,
        train_batch_size=1,
        max_train_steps=args.steps,
        learning_rate=1e-4,
        lr_warmup_steps=0,
        seed=0,
        report_to="none",
    )
    print(f"trained {result.steps} steps on {result.backend}: loss {result.metrics['train/loss']:.4f}, "
          f"pipeline in {result.output_dir}")

    # 2. Generate with the Flax pipeline API of diffusers' DreamBooth guide.
    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(result.output_dir)
    prompt_ids = pipeline.prepare_inputs([EXAMPLE_INSTANCE_PROMPT])
    images = pipeline(prompt_ids, params, jax.random.PRNGKey(0), num_inference_steps=4).images
    path = args.out_dir / "sample.png"
    pipeline.numpy_to_pil(images)[0].save(path)
    print(path)


if __name__ == "__main__":
    main()
