"""`jaxbooth train | generate | tiny-model | spec | doctor | export`: parse, pick the backend, hand over.

Kept thin on purpose: the work is in libraries that tests call directly. Backends are
imported lazily, so the JAX path never imports torch and vice versa. Every
``JaxboothError`` is printed as one message with no traceback (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jaxbooth import api, log
from jaxbooth.checkpoints import TrainingStopped
from jaxbooth.errors import JaxboothError

if TYPE_CHECKING:
    from jaxbooth.spec import RunSpec

USAGE = """usage: jaxbooth <command> [options]

commands:
  train        DreamBooth fine-tuning: jaxbooth train [SCRIPT.py] [--config RUN.yaml] [--KEY VALUE ...]
               takes the flags of diffusers' train_dreambooth*.py; SCRIPT.py (e.g. train_dreambooth_lora.py)
               selects that script's defaults and mode
  generate     images from a trained pipeline or LoRA: jaxbooth generate MODEL_DIR "prompt" -n 4
  tiny-model   write a random-weight pipeline: jaxbooth tiny-model OUT [--size tiny|small]
               [--family sd|sdxl|if-stage1|if-stage2]
  spec         print the resolved run spec as YAML (same arguments as train)
  doctor       devices, versions, mesh, compilation cache, backend choice and the checks that fail
               late (Hub token, output folder, disk): jaxbooth doctor [TRAIN FLAGS...]
  export       one .safetensors in the original Stable Diffusion layout (AUTOMATIC1111, ComfyUI) from a
               pipeline, an output folder or a checkpoint-N: jaxbooth export --single-file PATH [--out FILE]

jaxbooth <command> --help lists the options of a command.
"""


def load_or_help(argv: Sequence[str], prog: str) -> tuple[RunSpec, set[str]] | None:
    """(spec, keys the command line set) from one parse of ``argv``; None after printing ``--help``."""
    from jaxbooth.spec import HelpRequested, load_spec_with_keys

    try:
        return load_spec_with_keys(list(argv), prog=prog)
    except HelpRequested as shown:
        print(shown.text, end="")
        return None


def cmd_train(argv: Sequence[str]) -> int:
    """Parse, then the run ``jaxbooth.train`` does too (``api.run``: backend, packages, defaults, dispatch)."""
    loaded = load_or_help(argv, "jaxbooth train")
    if loaded is None:
        return 0
    api.run(*loaded)
    return 0


def cmd_spec(argv: Sequence[str]) -> int:
    import yaml

    from jaxbooth.spec import shareable_spec_dict

    loaded = load_or_help(argv, "jaxbooth spec")
    if loaded is not None:
        # printed specs get pasted into issues and logs: never the token
        print(yaml.safe_dump(shareable_spec_dict(loaded[0]), sort_keys=False), end="")
    return 0


def cmd_tiny_model(argv: Sequence[str]) -> int:
    from jaxbooth.tiny import FAMILIES, SIZES, write_tiny_pipeline

    parser = argparse.ArgumentParser(prog="jaxbooth tiny-model",
                                     description="random-weight SD-, SDXL- or DeepFloyd-IF-shaped pipeline in "
                                                 "diffusers format")
    parser.add_argument("out")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--family", choices=FAMILIES, default="sd",
                        help="sd: StableDiffusionPipeline; sdxl: StableDiffusionXLPipeline (two text encoders); "
                             "if-stage1: IFPipeline (64 px, T5); if-stage2: IFSuperResolutionPipeline (64 -> 256 "
                             "px); the if-* families need the torch extra")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_pipeline(args.out, args.size, args.seed, family=args.family))
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxbooth generate", description="sample images from a pipeline, or from a LoRA on its base model",
        epilog="A LoRA output folder (pytorch_lora_weights.safetensors, no model_index.json) or a LoRA .safetensors "
               "file (diffusers, peft or kohya keys) is merged into its base model first; the base is "
               "--pretrained_model_name_or_path, else the folder's jaxbooth_run.yaml, checkpoint marker or "
               "README.md base_model. SD and SDXL sample on the jax backend, DeepFloyd IF on the torch one "
               "(diffusers' IFPipeline / IFSuperResolutionPipeline, scheduler switched to fixed_small variance).")
    parser.add_argument("model_dir", help="a diffusers SD, SDXL or DeepFloyd IF pipeline folder (or Hub id in the "
                                          "local cache), a LoRA output folder, or a LoRA .safetensors file")
    parser.add_argument("prompt")
    parser.add_argument("-n", "--num_images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the pipeline's, 5.0 for SDXL, 7.5 for SD)")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="default: from the model")
    parser.add_argument("--out", default="samples")
    parser.add_argument("--pretrained_model_name_or_path", default=None, metavar="BASE",
                        help="LoRA only: the base pipeline (folder or Hub id) to merge it into; default: the "
                             "one the LoRA's folder records")
    parser.add_argument("--lora_scale", type=float, default=None, metavar="SCALE",
                        help="LoRA only: multiplies the adapters, as diffusers' cross_attention_kwargs "
                             "{'scale': SCALE} or fuse_lora(lora_scale=SCALE); 0 samples the base model "
                             "(default: 1.0)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="DeepFloyd IF stage II (IFSuperResolutionPipeline) only, and required there: the "
                             "low-resolution image to upscale, e.g. a stage I output")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        raise JaxboothError("generate: -n and --steps must be at least 1")
    options = dict(num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance,
                   negative_prompt=args.negative_prompt, scheduler=args.scheduler, seed=args.seed,
                   resolution=args.resolution, out_dir=args.out,
                   pretrained_model_name_or_path=args.pretrained_model_name_or_path, lora_scale=args.lora_scale)
    if sampled_family(args.model_dir, args.pretrained_model_name_or_path, args.image) == "deepfloyd_if":
        try:
            from jaxbooth.torch_backend.generate import generate_to_dir as torch_generate
        except ImportError as error:
            raise JaxboothError(f"DeepFloyd IF samples on the torch backend, which is not available here ({error}); "
                                "install the torch extra: pip install 'jaxbooth[torch]'") from None
        paths = torch_generate(args.model_dir, args.prompt, image=args.image, **options)
    else:
        from jaxbooth.jax_backend.generate import generate_to_dir

        paths = generate_to_dir(args.model_dir, args.prompt, **options)
    for path in paths:
        print(path)
    return 0


def sampled_family(model_dir: str, base: str | None, image: str | None) -> str | None:
    """The family ``generate`` samples (the pipeline's, or a LoRA's base's, from model_index.json); refuses
    ``--image`` anywhere but on an IF stage II pipeline, which needs it, before any model loads."""
    from jaxbooth import pipelines
    from jaxbooth.lora.base_model import sampled_pipeline_class

    name = sampled_pipeline_class(model_dir, base)
    if name == "IFSuperResolutionPipeline" and image is None:
        raise JaxboothError(f"{model_dir}: an IFSuperResolutionPipeline (DeepFloyd IF stage II) upscales an image; "
                            "pass the low-resolution one with --image PATH")
    if image is not None:
        if name != "IFSuperResolutionPipeline":
            raise JaxboothError(f"--image: {model_dir} samples a {name}, which takes no input image (only DeepFloyd "
                                "IF stage II, IFSuperResolutionPipeline, does); drop --image")
        if not Path(image).is_file():
            raise JaxboothError(f"--image {image}: no such file; pass the low-resolution image to upscale")
    return pipelines.family_of(name)


def cmd_export(argv: Sequence[str]) -> int:
    from jaxbooth import single_file

    parser = argparse.ArgumentParser(
        prog="jaxbooth export",
        description="write a Stable Diffusion 1.x/2.x or SDXL model as one .safetensors in the original Stable "
                    "Diffusion key layout, the one AUTOMATIC1111 and ComfyUI load (and diffusers' from_single_file)",
        epilog="PATH may be a diffusers pipeline folder, a jaxbooth train output folder, or one of its checkpoint-N "
               "folders (which hold only the trained components: the rest comes from the base model the run "
               "recorded). A LoRA output or checkpoint is merged into its base model first; for the LoRA alone in "
               "A1111's form, train with --output_kohya_format. DeepFloyd IF has no single-file form.")
    parser.add_argument("--single-file", "--single_file", dest="single_file", required=True, metavar="PATH",
                        help="the pipeline, output folder or checkpoint-N folder to convert")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the .safetensors to write (or a folder for it); default: <output folder>/<its "
                             "name>.safetensors, or <checkpoint-N>/<run name>-step<N>.safetensors")
    parser.add_argument("--save_precision", "--save-precision", choices=single_file.PRECISIONS, default=None,
                        help=f"dtype of the weights in the file (default: {single_file.DEFAULT_PRECISION})")
    args = parser.parse_args(argv)
    print(single_file.export(args.single_file, args.out, args.save_precision))
    return 0


def cmd_doctor(argv: Sequence[str]) -> int:
    from jaxbooth.doctor import cmd_doctor as doctor

    return doctor(argv)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "tiny-model": cmd_tiny_model, "spec": cmd_spec,
            "doctor": cmd_doctor, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    log.setup_logging()
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"jaxbooth: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    try:
        return COMMANDS[command](rest)
    except JaxboothError as error:
        print(f"jaxbooth {command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped:  # a preemption saved its checkpoint: no failure, the relaunch resumes
        return 0
    except KeyboardInterrupt:
        print(f"jaxbooth {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
