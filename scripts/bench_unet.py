#!/usr/bin/env python
"""Flax UNet forward+backward throughput against diffusers' PyTorch UNet, same weights, one process.

Builds jaxbooth's ``FlaxUNet2DConditionModel`` for a tiny config (``jaxbooth.tiny``) with
random params, exports them in diffusers' layout and loads them into
``diffusers.UNet2DConditionModel`` (and, with ``--compare diffusers-flax``, hands them to
diffusers' own ``FlaxUNet2DConditionModel``), then times one forward+backward (loss =
mean(pred**2), gradients for every param) on each, fp32, interleaving the models iteration
by iteration so machine noise lands on all alike. Compile time is reported apart from step
time; FLOPs come from XLA's cost analysis of the compiled step (the same count is used for
every model).

Prints ONE JSON line (see scripts/README.md for the fields); ``--table`` adds a human table
on stderr. Compare numbers only from the same device kind.

    python scripts/bench_unet.py                      # small model, 128 px (32x32 latents), batch 1 and 4
    python scripts/bench_unet.py --tiny --steps 1     # smoke run (the tiny model's compile: ~20-40 s on 2 cores)
    PYTHONPATH=. $JB_BENCH/venv-old/bin/python scripts/bench_unet.py --compare torch,diffusers-flax
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOKENS = 77  # CLIP's max length: the text-conditioning length the trainers use


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """Device kind and library versions (torch/diffusers only when already imported)."""
    import jax

    device = jax.devices()[0]
    info = {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__}
    for name in ("jaxlib", "flax", "torch", "diffusers"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", None)
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def xla_cost(compiled) -> dict:
    """FLOPs and bytes accessed from XLA's cost analysis (a dict, or a list of per-module dicts)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception as error:  # some backends do not implement it
        return {"flops": None, "cost_analysis_error": str(error)}
    if isinstance(analysis, dict):
        analysis = [analysis]
    analysis = [a for a in (analysis or []) if a]
    if not analysis:
        return {"flops": None}
    return {"flops": sum(float(a.get("flops", 0.0)) for a in analysis),
            "bytes_accessed": sum(float(a.get("bytes accessed", 0.0)) for a in analysis)}


def xla_memory(compiled) -> dict:
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return {}
    if stats is None:
        return {}
    return {key: int(getattr(stats, key)) for key in ("argument_size_in_bytes", "output_size_in_bytes",
                                                       "temp_size_in_bytes") if hasattr(stats, key)}


def matmul_peak(n: int = 2048, iters: int = 10, dtype: str = "float32") -> dict:
    """Measured matmul rate in ``dtype`` (the MFU denominator on machines with no published peak): median of
    ``iters``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), getattr(jnp, dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), getattr(jnp, dtype))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"n": n, "dtype": dtype, "iters": iters, "median_s": median, "flops_per_s": 2 * n**3 / median,
            "best_flops_per_s": 2 * n**3 / min(times)}


def summarize(times: list[float], batch: int, flops: float | None) -> dict:
    median = statistics.median(times)
    out = {"iters": len(times), "median_s": median, "min_s": min(times), "max_s": max(times),
           "samples_per_s": batch / median}
    if flops:
        out["flops_per_s"] = flops / median
    return out


class FlaxUNet:
    """jit-compiled fwd+bwd of jaxbooth's Flax UNet (NHWC in and out)."""

    name = "flax"
    nchw = False

    def __init__(self, config_dict: dict, seed: int, params=None, attention: str = "auto"):
        import jax

        from jaxbooth.jax_backend.models import unet

        self.attention = attention
        self.config = unet.unet_config_from_dict(config_dict)
        self.model = self.make_module(config_dict)
        self.params = params if params is not None else unet.init_params(self.config, jax.random.PRNGKey(seed))

        def loss(params, sample, timesteps, context):
            return (self.predict(params, sample, timesteps, context).astype("float32") ** 2).mean()

        self.step = jax.jit(jax.value_and_grad(loss))
        self.forward_fn = jax.jit(self.predict)
        self.compiled: dict[int, object] = {}

    def make_module(self, config_dict: dict):
        from jaxbooth.jax_backend.models import unet

        return unet.FlaxUNet2DConditionModel(self.config, attention_kernel=self.attention)

    def predict(self, params, sample, timesteps, context):
        return self.model.apply({"params": params}, sample, timesteps, context)

    def compile(self, inputs) -> dict:
        start = time.perf_counter()
        lowered = self.step.lower(self.params, *inputs)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
        self.compiled[inputs[0].shape[0]] = compiled
        return {"lower_s": lower_s, "compile_s": compile_s, **xla_cost(compiled), **xla_memory(compiled)}

    def run(self, inputs) -> float:
        import jax

        compiled = self.compiled[inputs[0].shape[0]]
        start = time.perf_counter()
        jax.block_until_ready(compiled(self.params, *inputs))
        return time.perf_counter() - start

    def forward_nhwc(self, inputs):
        import numpy as np

        out = np.asarray(self.forward_fn(self.params, *inputs))
        return out.transpose(0, 2, 3, 1) if self.nchw else out


class DiffusersFlaxUNet(FlaxUNet):
    """diffusers' own ``FlaxUNet2DConditionModel`` (diffusers < 0.40, NCHW), on jaxbooth's params (same names)."""

    name = "diffusers_flax"
    nchw = True

    def make_module(self, config_dict: dict):
        from diffusers import FlaxUNet2DConditionModel

        return FlaxUNet2DConditionModel.from_config(config_dict)

    def predict(self, params, sample, timesteps, context):
        return self.model.apply({"params": params}, sample, timesteps, context).sample


class TorchUNet:
    """diffusers' ``UNet2DConditionModel`` loaded from the Flax params exported in diffusers' layout (NCHW)."""

    name = "torch"

    def __init__(self, flax_params, config_dict: dict, work_dir: Path):
        import torch
        from diffusers import UNet2DConditionModel

        from jaxbooth.jax_backend.pretrained import save_diffusers_component

        folder = save_diffusers_component(flax_params, config_dict, work_dir, "unet")
        self.torch = torch
        self.model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).train()

    def compile(self, inputs) -> dict:
        return {}

    def run(self, inputs) -> float:
        self.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        pred = self.model(*inputs).sample
        (pred.float() ** 2).mean().backward()
        return time.perf_counter() - start

    def forward_nhwc(self, inputs):
        with self.torch.no_grad():
            return self.model(*inputs).sample.numpy().transpose(0, 2, 3, 1)


def make_inputs(batch: int, latent: int, channels: int, context_dim: int, seed: int):
    """The same random inputs for every model: {"nhwc": jax arrays, "nchw": jax arrays, "torch": NCHW tensors}."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, latent, latent, channels), dtype=np.float32)
    timesteps = rng.integers(0, 1000, (batch,)).astype(np.int32)
    context = rng.standard_normal((batch, TOKENS, context_dim), dtype=np.float32)
    nchw = sample.transpose(0, 3, 1, 2).copy()
    inputs = {"nhwc": (jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)),
              "nchw": (jnp.asarray(nchw), jnp.asarray(timesteps), jnp.asarray(context))}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        inputs["torch"] = (torch.from_numpy(nchw), torch.from_numpy(timesteps).long(), torch.from_numpy(context))
    return inputs


def inputs_for(runner, inputs: dict):
    if runner.name == "torch":
        return inputs["torch"]
    return inputs["nchw"] if runner.nchw else inputs["nhwc"]


def vae_downsampling(size: str) -> int:
    """Image px per latent px of the ``size`` pipeline's VAE (a 2x downsample between encoder blocks)."""
    from jaxbooth import tiny

    return 2 ** (len(tiny.vae_config(size)["block_out_channels"]) - 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="jaxbooth.tiny model size")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke settings: --size tiny, batch 1, 1 warm-up, no matmul peak")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image px (default: the size's, small=128); latents are resolution / the VAE's "
                        "downsampling (4 for small, 2 for tiny: 32x32 for both)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per model and batch (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="auto",
                        help="jaxbooth attention kernel (auto, xla, dot_product, chunked; see models/attention.py)")
    parser.add_argument("--compare", default="torch",
                        help="comma list of peers timed against jaxbooth's Flax UNet: torch (diffusers' PyTorch "
                        "UNet), diffusers-flax (diffusers' own Flax UNet: needs diffusers<0.40, e.g. "
                        "$JB_BENCH/venv-old/bin/python with PYTHONPATH=.), or none (default: torch)")
    parser.add_argument("--no-torch", action="store_true", help="same as --compare=none")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--table", action="store_true", help="also print a human table on stderr")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
        args.batch = args.batch or [1]
        args.warmup = min(args.warmup, 1)
        args.no_peak = True
    args.batch = args.batch or [1, 4]
    args.compare = [] if args.no_torch or args.compare == "none" else args.compare.split(",")
    unknown = set(args.compare) - {"torch", "diffusers-flax"}
    if unknown:
        parser.error(f"--compare: unknown {sorted(unknown)}; choose from torch, diffusers-flax, none")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from jaxbooth import tiny

    if "torch" in args.compare:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
    if args.compare:
        import diffusers  # noqa: F401  (version in device_info)
    config_dict = tiny.unet_config(args.size)
    resolution = args.resolution or tiny.RESOLUTION[args.size]
    latent = resolution // vae_downsampling(args.size)
    ours = FlaxUNet(config_dict, args.seed, attention=args.attention)
    runners = [ours]
    if "diffusers-flax" in args.compare:
        runners.append(DiffusersFlaxUNet(config_dict, args.seed, params=ours.params))
    if "torch" in args.compare:
        with tempfile.TemporaryDirectory(prefix="bench-unet-") as tmp:
            runners.append(TorchUNet(jax.device_get(ours.params), config_dict, Path(tmp)))
    results = []
    for batch in args.batch:
        inputs = make_inputs(batch, latent, ours.config.in_channels, ours.config.encoder_hidden_dim,
                             args.seed + batch)
        entry = {"batch": batch}
        for runner in runners:
            info = runner.compile(inputs_for(runner, inputs))
            if info:
                entry[f"{runner.name}_compile"] = info
        if batch == args.batch[0] and len(runners) > 1:  # evidence that every model holds the same weights
            reference = ours.forward_nhwc(inputs["nhwc"])
            for runner in runners[1:]:
                diff = float(abs(reference - runner.forward_nhwc(inputs_for(runner, inputs))).max())
                entry[f"forward_max_abs_diff_{runner.name}"] = diff
        for _ in range(args.warmup):
            for runner in runners:
                runner.run(inputs_for(runner, inputs))
        times = {runner.name: [] for runner in runners}
        for _ in range(args.steps):  # interleaved: ours, peer(s), ours, peer(s), ...
            for runner in runners:
                times[runner.name].append(runner.run(inputs_for(runner, inputs)))
        flops = entry["flax_compile"].get("flops")
        entry["flops_per_step"] = flops
        for runner in runners:
            entry[runner.name] = summarize(times[runner.name], batch, flops)
        for runner in runners[1:]:
            peer = entry[runner.name]
            entry[f"speedup_flax_vs_{runner.name}"] = peer["median_s"] / entry["flax"]["median_s"]
            # best-of ratio: less sensitive to other load (torch's OpenMP threads suffer most from it)
            entry[f"speedup_flax_vs_{runner.name}_min"] = peer["min_s"] / entry["flax"]["min_s"]
        results.append(entry)
    peak = None if args.no_peak else matmul_peak()
    if peak:
        for entry in results:
            for runner in runners:
                if entry[runner.name].get("flops_per_s"):
                    entry[runner.name]["fraction_of_matmul_peak"] = entry[runner.name]["flops_per_s"] / peak[
                        "flops_per_s"]
    record = {"bench": "unet", **device_info(),
              "config": {"size": args.size, "attention": args.attention, "resolution": resolution,
                         "latent": [latent, latent],
                         "tokens": TOKENS, "dtype": "float32", "steps": args.steps, "warmup": args.warmup,
                         "seed": args.seed, "compare": args.compare,
                         "unet": {k: config_dict[k] for k in ("block_out_channels", "layers_per_block",
                                                              "cross_attention_dim", "attention_head_dim")}},
              "loadavg": list(os.getloadavg()), "matmul_peak": peak, "results": results}
    print(json.dumps(record), flush=True)
    if args.table:
        print_table(record, [r.name for r in runners], sys.stderr)
    return 0


def print_table(record: dict, names: list[str], stream) -> None:
    c = record["config"]
    print(f"UNet fwd+bwd, size={c['size']} {c['resolution']} px ({c['latent'][0]}x{c['latent'][1]} latents), fp32, "
          f"{record['device_kind']} ({record['cpu']}), load {record['loadavg'][0]:.1f}; "
          "speedup = peer median / flax median (best-of in brackets)", file=stream)
    header = f"{'batch':>5} {'model':>15} {'median s':>9} {'min s':>7} {'samples/s':>9} {'GFLOP/s':>8} {'speedup':>14}"
    print(header + f" {'GFLOP':>7} {'compile s':>9}", file=stream)
    for e in record["results"]:
        for name in names:
            r = e[name]
            speed = (f"{e[f'speedup_flax_vs_{name}']:.2f} ({e[f'speedup_flax_vs_{name}_min']:.2f})"
                     if name != "flax" else "")
            compile_info = e.get(f"{name}_compile", {})
            print(f"{e['batch']:>5} {name:>15} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['samples_per_s']:9.2f} "
                  f"{r.get('flops_per_s', 0) / 1e9:8.1f} {speed:>14} "
                  f"{(compile_info.get('flops') or 0) / 1e9:7.2f} {compile_info.get('compile_s', float('nan')):9.1f}",
                  file=stream)


if __name__ == "__main__":
    sys.exit(main())
