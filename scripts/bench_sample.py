#!/usr/bin/env python
"""Text-to-image sampling speed: jaxbooth's jitted Flax sampler vs diffusers' PyTorch `StableDiffusionPipeline`.

Same pipeline folder (weights), same sampler (scheduler class), steps, guidance, batch and
size, fp32 both, on this machine. Each backend runs in its own subprocess, so neither holds
the other's threads or GPU memory (JAX preallocates most of a GPU). A warm-up call (JAX:
compile) is excluded; then `--repeats` timed calls of `--batch` prompts, each ending with
PIL images on the host (decode and device->host copy included on both sides); images/s
uses the median call.

Default model: the `small` random pipeline (`jaxbooth tiny-model DIR --size small`, built into
the jaxbooth cache on first use). Its VAE has 3 blocks, i.e. 4 px per latent, so the default
256 x 256 images are "512-px-shaped": 64 x 64 latents, the latent size of SD 1.5 at 512 px.

Prints one JSON line (device kind, versions, settings, compile time, images/s of each and the
ratio jax/torch); a human summary goes to stderr.

    python scripts/bench_sample.py                         # small model, 20 steps, batch 1, 3 repeats
    python scripts/bench_sample.py --steps 10 --batch 2 --repeats 2
    python scripts/bench_sample.py --model_dir PIPE --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photo of sks toy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=None, help="diffusers SD pipeline folder (default: the small model)")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="prompts per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class, both backends")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--only", choices=("jax", "torch"), help=argparse.SUPPRESS)  # subprocess mode
    return parser.parse_args(argv)


def default_model_dir() -> Path:
    from jaxbooth.tiny import builtin_tiny_model

    return builtin_tiny_model("small")


def timed_calls(call, repeats: int) -> tuple[float, list[float]]:
    """(warm-up seconds, per-call seconds of the timed calls)."""
    start = time.perf_counter()
    call()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return warmup, times


def bench_jax(args: argparse.Namespace) -> dict:
    import jax

    from jaxbooth.jax_backend.generate import load_pipeline_sampler

    sampler = load_pipeline_sampler(Path(args.model_dir), sampler_name=args.scheduler)
    prompts = [PROMPT] * args.batch

    def call() -> None:
        images = sampler.generate(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=0,
                                  height=args.size, width=args.size)
        assert len(images) == args.batch

    warmup, times = timed_calls(call, args.repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    return {"device": device.device_kind, "jax_version": jax.__version__, "warmup_s": warmup, "times_s": times,
            "peak_bytes": (stats or {}).get("peak_bytes_in_use"),
            "latent_size": args.size // sampler.vae_scale_factor}


def bench_torch(args: argparse.Namespace) -> dict:
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * args.batch

    def call() -> None:
        with torch.inference_mode():
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size,
                          width=args.size, generator=torch.Generator(device).manual_seed(0)).images
        assert len(images) == args.batch

    warmup, times = timed_calls(call, args.repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"device": name, "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
            "warmup_s": warmup, "times_s": times, "peak_bytes": peak}


def run_child(backend: str, args: argparse.Namespace) -> dict:
    """One backend in a fresh interpreter; its last stdout line is its JSON result."""
    argv = [sys.executable, __file__, "--only", backend, "--model_dir", str(args.model_dir), "--size", str(args.size),
            "--steps", str(args.steps), "--batch", str(args.batch), "--repeats", str(args.repeats),
            "--guidance", str(args.guidance), "--scheduler", args.scheduler]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise SystemExit(f"bench_sample: the {backend} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def images_per_sec(result: dict, batch: int) -> float:
    """From the median call: robust to a call slowed by other load on a shared machine."""
    return batch / statistics.median(result["times_s"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_dir is None:
        args.model_dir = str(default_model_dir())
    if args.only:
        print(json.dumps(bench_jax(args) if args.only == "jax" else bench_torch(args)))
        return 0
    jax_result = run_child("jax", args)
    torch_result = None if args.skip_torch else run_child("torch", args)
    line = {
        "bench": "sample", "model_dir": args.model_dir, "height": args.size, "width": args.size,
        "latent_hw": jax_result["latent_size"], "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "guidance_scale": args.guidance, "scheduler": args.scheduler, "dtype": "float32",
        "jax": {**jax_result, "images_per_sec": images_per_sec(jax_result, args.batch)},
    }
    if torch_result is not None:
        line["torch"] = {**torch_result, "images_per_sec": images_per_sec(torch_result, args.batch)}
        line["ratio_jax_over_torch"] = line["jax"]["images_per_sec"] / line["torch"]["images_per_sec"]
    print(json.dumps(line))
    summary = f"jax {line['jax']['images_per_sec']:.3f} img/s (compile+first call {jax_result['warmup_s']:.1f}s)"
    if torch_result is not None:
        summary += (f", torch {line['torch']['images_per_sec']:.3f} img/s, "
                    f"ratio {line['ratio_jax_over_torch']:.2f}x")
    print(f"bench_sample on {jax_result['device']}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
