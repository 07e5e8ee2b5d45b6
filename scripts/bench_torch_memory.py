#!/usr/bin/env python
"""The guide's GPU memory recipes on an SD-1.5-shaped UNet: peak memory and s/step per recipe.

Builds diffusers' ``UNet2DConditionModel`` with SD-1.5's shape (860M params, random weights:
no download) and trains it on random 512-px-sized inputs (64x64x4 latents, 77x768 text
states) with the torch backend's own pieces (``jaxbooth.torch_backend.memory`` and
``optim``), once per recipe:

- ``adamw``: fp32 AdamW, as ``train_dreambooth.py`` with no memory flags;
- ``checkpointing``: ``--gradient_checkpointing``;
- ``adam8bit``: ``--use_8bit_adam`` (bitsandbytes);
- ``checkpointing+adam8bit``: the guide's 16 GB recipe.

Prints ONE JSON line: device, versions, and per recipe ``peak_gb`` (CUDA allocator peak,
``torch.cuda.max_memory_allocated``) and ``s_per_step`` (median of the timed steps). Needs a
CUDA GPU for the real shape; ``--shape tiny`` runs the same code on a small UNet anywhere
(the CPU smoke test), reporting max RSS instead.

    python scripts/bench_torch_memory.py                      # GPU, SD-1.5 shape, all recipes
    python scripts/bench_torch_memory.py --recipes adamw,checkpointing --steps 5
    python scripts/bench_torch_memory.py --shape tiny --steps 2   # anywhere, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

RECIPES = {
    "adamw": {"gradient_checkpointing": False, "use_8bit_adam": False},
    "checkpointing": {"gradient_checkpointing": True, "use_8bit_adam": False},
    "adam8bit": {"gradient_checkpointing": False, "use_8bit_adam": True},
    "checkpointing+adam8bit": {"gradient_checkpointing": True, "use_8bit_adam": True},
}
# SD-1.5's UNet is diffusers' default config; "tiny" keeps its structure at a smoke-test size.
SHAPES = {
    "sd15": {"config": {}, "latent": 64, "text": (77, 768)},
    "tiny": {"config": {"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
                        "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 16},
             "latent": 16, "text": (77, 32)},
}


def make_optimizer(params, use_8bit_adam: bool, lr: float = 5e-6):
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def run_recipe(shape: dict, recipe: dict, steps: int, device) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shape["config"]).to(device)
    if recipe["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(unet.parameters(), recipe["use_8bit_adam"])
    latent, (tokens, width) = shape["latent"], shape["text"]
    sample = torch.randn(1, 4, latent, latent, device=device)
    context = torch.randn(1, tokens, width, device=device)
    timesteps = torch.randint(0, 1000, (1,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        loss = unet(sample, timesteps, context).sample.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process-wide, monotonic
    params = sum(p.numel() for p in unet.parameters())
    del unet, optimizer, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_gb": peak, "s_per_step": statistics.median(times[1:]), "params": params,
            "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss_process"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sd15")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {list(RECIPES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per recipe (after one warm-up)")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")

    import diffusers
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "sd15" and device.type != "cuda":
        print("bench_torch_memory: the SD-1.5 shape needs a CUDA GPU (~14 GB for fp32 AdamW); "
              "use --shape tiny for a CPU smoke run", file=sys.stderr)
        return 2
    results = {name: run_recipe(SHAPES[args.shape], RECIPES[name], args.steps, device) for name in recipes}
    record = {"bench": "torch_memory", "shape": args.shape, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "steps": args.steps,
              "batch": 1, "resolution": SHAPES[args.shape]["latent"] * 8, "recipes": results}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
