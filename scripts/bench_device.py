#!/usr/bin/env python
"""One-command device benchmark: jaxbooth's JAX train step and its torch backend on SD-1.5/SDXL-shaped UNets.

Prints ONE JSON line per row (see scripts/README.md, "bench_device.py"): device, versions, model
shape, resolution, batch, precision, attention kernel, remat, compile s, s/step, images/s, MFU and
peak device memory. Random weights at the real shapes (configs below; no downloads). Each row runs
in its own process (peak memory per row; an OOM or crash cannot spoil the next row; JAX's
preallocation cannot starve torch) under one wall-clock budget: rows that no longer fit print a
``skipped`` line. ``--smoke`` runs every row on tiny shapes on the CPU, in this process.

    python scripts/bench_device.py                          # GPU/TPU: all rows, in priority order, <= 8 min
    python scripts/bench_device.py --backend jax --rows jax-sd15-full-b8,jax-sdxl-full-remat-b1
    python scripts/bench_device.py --smoke --steps 1        # anywhere, seconds per row
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # bench_unet's helpers and bench_device_torch, also when imported by a test
    sys.path.insert(0, str(SCRIPTS))
TOKENS = 77  # CLIP's max length
LORA_RANK = 4
LEARNING_RATE = 1e-5

# SD 1.5's UNet config.json (runwayml/stable-diffusion-v1-5, unet/), and SDXL base 1.0's.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# --smoke: one cross-attention block, no mid block (the smallest compile that still has LoRA targets and,
# for SDXL, the text_time embedding, linear projections and per-block heads).
_SMOKE_BASE = {"block_out_channels": [32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8,
               "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
               "mid_block_type": None}
SMOKE_SD15_UNET = {**SD15_UNET, **_SMOKE_BASE, "cross_attention_dim": 16, "attention_head_dim": 4}
SMOKE_SDXL_UNET = {**SDXL_UNET, **_SMOKE_BASE, "cross_attention_dim": 32, "attention_head_dim": [4],
                   "transformer_layers_per_block": [1], "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 6 * 8 + 16}


@dataclass(frozen=True)
class Shape:
    """A UNet at one resolution: latents are resolution / 8 (the SD VAE); ``pooled`` > 0 for SDXL."""

    model: str
    unet: dict
    resolution: int
    pooled: int = 0

    @property
    def latent(self) -> int:
        return self.resolution // 8

    @property
    def text_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])


SHAPES = {"sd15": Shape("sd15", SD15_UNET, 512), "sdxl": Shape("sdxl", SDXL_UNET, 1024, pooled=1280)}
SMOKE_SHAPES = {"sd15": Shape("sd15", SMOKE_SD15_UNET, 64), "sdxl": Shape("sdxl", SMOKE_SDXL_UNET, 64, pooled=16)}


@dataclass(frozen=True)
class Row:
    """One benchmark row. ``recipe``: the torch memory recipe (``16gb``: 8-bit Adam + gradient checkpointing;
    ``12gb``: also ``set_grads_to_none``), from diffusers' DreamBooth guide."""

    name: str
    backend: str
    model: str
    training: str  # "full" or "lora"
    batch: int
    remat: bool = False
    recipe: str | None = None


def _rows() -> list[Row]:
    """Every row, most wanted first (the budget skips the tail): the issue's goals (SD-1.5 full at batch 8
    on both backends, SDXL full with remat), the memory recipes, then the rest of the grid."""
    grid = [("sd15", "full", 8, False), ("sdxl", "full", 1, True), ("sd15", "lora", 8, False),
            ("sd15", "full", 1, False), ("sd15", "lora", 1, False), ("sdxl", "lora", 1, False),
            ("sdxl", "full", 4, True), ("sdxl", "lora", 4, False)]
    rows = []
    for model, training, batch, remat in grid:
        for backend in ("jax", "torch"):
            name = f"{backend}-{model}-{training}{'-remat' if remat else ''}-b{batch}"
            rows.append(Row(name, backend, model, training, batch, remat))
        if (model, training, batch) == ("sdxl", "full", 1):
            rows += [Row(f"torch-sd15-{r}-b1", "torch", "sd15", "full", 1, True, r) for r in ("16gb", "12gb")]
    return rows


ROWS = {row.name: row for row in _rows()}

# Published dense bf16 peaks per chip (FLOP/s), matched on the device kind (lower case, first match wins).
PUBLISHED_PEAKS: list[tuple[str, str, float]] = [
    (r"h100.*pcie", "H100 PCIe", 756e12), (r"h100.*nvl", "", 0.0), (r"h100", "H100 SXM", 989e12),
    (r"h200", "H200", 989e12), (r"a100", "A100", 312e12), (r"\bl4\b", "L4", 121e12), (r"tpu v4", "TPU v4", 275e12),
    (r"tpu v5 ?(lite|e)", "TPU v5e", 197e12), (r"tpu v5", "TPU v5p", 459e12), (r"tpu v6", "TPU v6e", 918e12),
]


def published_peak(device_kind: str) -> tuple[float, str] | None:
    """(bf16 FLOP/s, "published <name>") for a known device kind, else None (then a measured peak is used)."""
    kind = device_kind.lower()
    for pattern, name, flops in PUBLISHED_PEAKS:
        if re.search(pattern, kind):
            return (flops, f"published {name} dense bf16") if flops else None
    return None


def select_rows(backend: str, names: str | None) -> list[Row]:
    """The rows to run, in table order (``--rows`` picks names; ``--backend`` filters)."""
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in ROWS]
        if unknown:
            raise SystemExit(f"bench_device: unknown row(s) {unknown}; rows are: {', '.join(ROWS)}")
        rows = [ROWS[n] for n in wanted]
    else:
        rows = list(ROWS.values())
    return [row for row in rows if backend in ("both", row.backend)]


# --- the JAX rows ------------------------------------------------------------------------------------------------

def jax_step(shape: Shape, row: Row, *, dtype, attention: str, remat: bool | str, abstract: bool, seed: int = 0):
    """jaxbooth's train step for a row: (step_fn, state, state shardings or None, frozen, batch, counts).

    ``abstract``: every array a ``ShapeDtypeStruct`` (for counting FLOPs; nothing is allocated). LoRA
    adapters come from ``lora.init_adapters`` over zero-strided host views of the base kernels: the
    starting adapters depend only on the kernels' shapes (``AdapterSettings.initial_layer``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxbooth import diffusion, tiny
    from jaxbooth.jax_backend import lora as lora_lib
    from jaxbooth.jax_backend import mesh as mesh_lib
    from jaxbooth.jax_backend import optim, train
    from jaxbooth.jax_backend.models import unet as unet_lib
    from jaxbooth.jax_backend.train_step import LossOptions, TrainState, make_train_step
    from jaxbooth.lora import AdapterSettings

    config = unet_lib.unet_config_from_dict(shape.unet)
    model = unet_lib.FlaxUNet2DConditionModel(config, dtype=dtype, attention_kernel=attention,
                                              gradient_checkpointing=remat)
    base_abstract = unet_lib.abstract_params(config)
    counts = {"unet_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(base_abstract)))}
    sds = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    if abstract:
        base = base_abstract
    elif counts["unet_params"] < 10_000_000:  # smoke shapes: the project's host draw, no init compile
        base = unet_lib.init_params(config, seed)
    else:
        base = random_device_params(base_abstract, seed)
    merge, frozen, trained = None, {}, {"unet": base}
    if row.training == "lora":
        settings = AdapterSettings(rank=LORA_RANK, alpha=float(LORA_RANK))
        views = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.float32), x.shape), base_abstract)
        adapters = lora_lib.init_adapters({"unet": views}, settings, seed)
        trained, frozen["base"], merge = adapters, {"unet": base}, lora_lib.step_merge(settings.scale)
    b, lat, rng = row.batch, shape.latent, np.random.default_rng(seed)
    host = {"latent_mean": rng.standard_normal((b, lat, lat, 4), np.float32),
            "latent_std": np.full((b, lat, lat, 4), 0.1, np.float32),
            "text_embeddings": rng.standard_normal((b, TOKENS, shape.text_dim), np.float32)}
    if shape.pooled:
        host["pooled_embeddings"] = rng.standard_normal((b, shape.pooled), np.float32)
        host["time_ids"] = np.tile(np.asarray([shape.resolution, shape.resolution, 0, 0] + [shape.resolution] * 2,
                                              np.float32), (b, 1))
    batch = {"example_idx": np.arange(b, dtype=np.int32), "prompt_idx": np.arange(b, dtype=np.int32)}
    tx = optim.make_optimizer(learning_rate_schedule=LEARNING_RATE)
    tables = diffusion.schedule_from_config(tiny.SCHEDULER_CONFIG).as_tables()
    step_fn = make_train_step(unet_apply=model.apply, text_apply=None, tx=tx,
                              lr_schedule=optax.constant_schedule(LEARNING_RATE), tables=tables,
                              options=LossOptions(), merge=merge)
    counts["trained_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(trained)))
    if abstract:
        trained_abstract = sds(trained)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained_abstract,
                           opt_state=jax.eval_shape(tx.init, trained_abstract),
                           rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        return step_fn, state, None, {**sds(host), **frozen}, sds(batch), counts
    mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
    state, shardings = train.init_state(trained, tx, mesh, seed)
    frozen = {**host, **frozen}
    frozen = jax.device_put(frozen, train.frozen_shardings(frozen, mesh))
    return step_fn, state, (shardings, mesh), frozen, batch, counts


def random_device_params(abstract, seed: int):
    """Random params drawn on the device (host NumPy draws of SDXL's 2.6 B params take a minute); the scheme of
    ``models.blocks.random_params``: LeCun-normal kernels, normal embeddings, unit scales, zero biases."""
    import jax
    import jax.numpy as jnp

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(key):
        out = []
        for key_i, (path, leaf) in zip(jax.random.split(key, len(flat)), flat, strict=True):
            name, shape = getattr(path[-1], "key", str(path[-1])), tuple(leaf.shape)
            if name in ("kernel", "embedding"):
                fan = max(1, math.prod(shape[:-1])) if name == "kernel" else shape[-1]
                out.append((jax.random.normal(key_i, shape, jnp.float32) / fan**0.5).astype(leaf.dtype))
            else:
                out.append(jnp.full(shape, 1.0 if name == "scale" else 0.0, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(draw)(jax.random.PRNGKey(seed))


def compute_dtype(smoke: bool):
    import jax.numpy as jnp

    return jnp.float32 if smoke else jnp.bfloat16


def model_flops(shape: Shape, row: Row, smoke: bool) -> dict:
    """XLA's FLOP count of the row's train step on the einsum model (``attention="xla"``, no remat): the model
    FLOPs, one count for both backends. From the lowered (not compiled) step: no compile, no allocation."""
    import jax
    from bench_unet import xla_cost

    step_fn, state, _, frozen, batch, _ = jax_step(shape, row, dtype=compute_dtype(smoke), attention="xla",
                                                   remat=False, abstract=True)
    cost = xla_cost(jax.jit(step_fn).lower(state, frozen, batch))
    return {"model_flops": cost.get("flops"), "model_flops_source": "XLA cost analysis, lowered einsum train step"}


def run_jax_row(row: Row, shape: Shape, args, deadline: float) -> dict:
    import jax
    from bench_unet import xla_cost, xla_memory

    from jaxbooth.jax_backend import train
    from jaxbooth.jax_backend.models.attention import resolve_kernel

    kernel = resolve_kernel(args.attention)
    remat = args.remat_policy if row.remat else False
    step_fn, state, placement, frozen, batch, counts = jax_step(shape, row, dtype=compute_dtype(args.smoke),
                                                                attention=kernel, remat=remat, abstract=False)
    shardings, mesh = placement
    if jax.default_backend() == "cpu":  # the trainer's CPU path (TwoPartStep) compiles twice as long; smoke only
        from jaxbooth.jax_backend import mesh as mesh_lib

        start = time.perf_counter()
        batch_shardings = jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), batch)
        frozen_placement = jax.tree.map(lambda x: x.sharding, frozen)
        compiled = jax.jit(step_fn, in_shardings=(shardings, frozen_placement, batch_shardings),
                           out_shardings=(shardings, mesh_lib.replicated(mesh)),
                           donate_argnums=(0,)).lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - start
    else:
        compiled, compile_s, batch_shardings = train.compile_step(step_fn, state, shardings, frozen, batch, mesh)
    info = {"compile_s": compile_s, "step_flops_xla": xla_cost(compiled).get("flops"), **xla_memory(compiled)}
    batch = train.put_batch(batch, batch_shardings)
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    times, loss = timed_steps(step, args.warmup, args.steps, deadline)
    stats = jax.devices()[0].memory_stats() or {}
    peak = ({"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "peak_memory_source": "jax peak_bytes_in_use"}
            if "peak_bytes_in_use" in stats else max_rss())
    return {"attention": args.attention, "attention_resolved": kernel,
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "remat": (args.remat_policy if row.remat else None), "optimizer": "optax AdamW (jax_backend.optim)",
            "precision": "fp32" if args.smoke else "bf16 compute, fp32 params and optimizer state",
            **counts, **info, **times, "loss": loss, **peak}


# --- shared measurement ------------------------------------------------------------------------------------------

def timed_steps(step, warmup: int, steps: int, deadline: float) -> tuple[dict, float]:
    """``warmup`` untimed steps, then up to ``steps`` timed ones while the next still fits before ``deadline``
    (at least one). ``step()`` runs one step to completion and returns the loss."""
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        loss = step()
    times: list[float] = []
    while len(times) < steps and (not times or time.time() + times[-1] < deadline):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"first_step_s": first, "warmup_steps": max(warmup, 1), "steps": len(times), "steps_requested": steps,
            "s_per_step": median, "s_per_step_min": min(times)}, loss


def max_rss() -> dict:
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_source": "max RSS of the process (no device memory stats here)"}


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "bitsandbytes", "peft"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", None)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["cuda"], out["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
    return out


def peak_flops(device_kind: str, platform: str, cache: dict) -> dict:
    """The MFU denominator: the published bf16 peak of the device kind, else a measured f32 ``jnp.dot`` rate
    (bench_unet.matmul_peak in bf16; f32 on CPU), else what the parent passed on (``cache``)."""
    published = published_peak(device_kind)
    if published:
        return {"peak_flops_per_s": published[0], "peak_source": published[1]}
    if cache.get("peak_flops_per_s"):
        return {k: cache[k] for k in ("peak_flops_per_s", "peak_source")}
    import jax

    if jax.default_backend() != platform:  # a torch row on a GPU unknown to the table: JAX is on the CPU here
        return {"peak_flops_per_s": None, "peak_source": f"no published peak for {device_kind!r}; run a JAX row"}
    from bench_unet import matmul_peak

    n, dtype = (4096, "bfloat16") if platform != "cpu" else (1024, "float32")  # bf16: what the rows compute in
    measured = matmul_peak(n=n, iters=5, dtype=dtype)
    cache.update(peak_flops_per_s=measured["best_flops_per_s"],
                 peak_source=f"measured {dtype} jnp.dot {n}x{n}, best of 5 (no published peak for {device_kind!r})")
    return {k: cache[k] for k in ("peak_flops_per_s", "peak_source")}


def run_row(row: Row, args, deadline: float, cache: dict) -> dict:
    """One row in this process: the backend's measurement plus device, versions, FLOPs and MFU."""
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)[row.model]
    wall = time.perf_counter()
    base = {"bench": "device", "row": row.name, "backend": row.backend, "model": row.model,
            "shape": "smoke" if args.smoke else "real", "training": row.training,
            "lora_rank": LORA_RANK if row.training == "lora" else None, "recipe": row.recipe,
            "unet": {k: shape.unet.get(k) for k in ("block_out_channels", "layers_per_block", "attention_head_dim",
                                                    "transformer_layers_per_block", "cross_attention_dim")},
            "resolution": shape.resolution, "latent": [shape.latent, shape.latent], "tokens": TOKENS,
            "batch": row.batch}
    try:
        import jax  # noqa: F401  (device_info, FLOP counts; on the CPU for torch rows)
        from bench_unet import device_info

        if row.backend == "jax":
            measured = run_jax_row(row, shape, args, deadline)
            device = device_info()
        else:
            from bench_device_torch import run_torch_row

            measured = run_torch_row(row, shape, steps=args.steps, warmup=args.warmup, deadline=deadline,
                                     smoke=args.smoke, timed_steps=timed_steps, host_peak=max_rss)
            device = {**device_info(), **measured.pop("device", {})}
    except Exception as error:  # an OOM (or any failure) is this row's result; the next row still runs
        text = f"{type(error).__name__}: {error}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError"))
        return {**base, "status": "oom" if oom else "error", "error": text[:2000], "wall_s": time.perf_counter() - wall}
    if measured.get("status") == "skipped":
        return {**base, **measured}
    key = f"{row.model}/{row.training}/{row.batch}/{'smoke' if args.smoke else 'real'}"
    if key not in cache:
        cache[key] = model_flops(shape, row, args.smoke)
    record = {**base, "status": "ok", **{k: device.get(k) for k in ("device_kind", "platform", "device_count",
                                                                     "cpu", "cpu_count", "python")},
              "versions": versions(), **measured, **cache[key]}
    record["images_per_s"] = row.batch / record["s_per_step"]
    record.update(peak_flops(record["device_kind"], record["platform"], cache))
    flops, peak = record["model_flops"], record["peak_flops_per_s"]
    record["achieved_flops_per_s"] = flops / record["s_per_step"] if flops else None
    record["mfu"] = record["achieved_flops_per_s"] / peak if flops and peak else None
    record["peak_memory_gb"] = record["peak_memory_bytes"] / 1e9
    record["wall_s"] = time.perf_counter() - wall
    return record


# --- orchestration -----------------------------------------------------------------------------------------------

def child_env(row: Row) -> dict:
    """A torch row's JAX (FLOP counts only) stays on the CPU; a JAX row may use 95% of the GPU (JAX's default
    75% would make SDXL's full fine-tune look like it needs a bigger GPU), unless the caller chose."""
    env = dict(os.environ)
    if row.backend == "torch":
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile_s is a cold compile
    return env


def run_isolated(row: Row, args, deadline: float, cache: dict) -> dict:
    """Run one row as ``bench_device.py --child``: its last stdout line is the record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row.name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), *(["--smoke"] if args.smoke else []), "--attention", args.attention,
           "--remat-policy", args.remat_policy,
           "--deadline", repr(deadline), "--carry", json.dumps(cache)]
    timeout = max(1.0, deadline - time.time()) + 15  # the row cuts its timed steps at the deadline; a compile can't
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(row), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"bench": "device", "row": row.name, "backend": row.backend, "status": "skipped",
                "reason": f"budget spent during the row (stopped after {timeout:.0f} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        record = json.loads(lines[-1])
        carried = record.pop("carry", {})
        cache.update(carried)
        return record
    return {"bench": "device", "row": row.name, "backend": row.backend, "status": "error",
            "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


def run_all(rows: list[Row], runner, budget_s: float, min_row_s: float, emit) -> list[dict]:
    """Run ``rows`` through ``runner(row, deadline)`` inside ``budget_s``; a row that cannot start with
    ``min_row_s`` left is a ``skipped`` record. Every record goes to ``emit`` as soon as it exists."""
    deadline = time.time() + budget_s
    records = []
    for row in rows:
        left = deadline - time.time()
        if left < min_row_s:
            record = {"bench": "device", "row": row.name, "backend": row.backend, "status": "skipped",
                      "reason": f"budget spent: {max(left, 0):.0f} s of --budget-s {budget_s:g} left"}
        else:
            record = runner(row, deadline)
        emit(record)
        records.append(record)
    return records


def parse_args(argv=None) -> argparse.Namespace:
    from_doc = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(description=from_doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="rows: " + ", ".join(ROWS))
    parser.add_argument("--rows", default=None, help="comma list of row names (default: all, in the listed order)")
    parser.add_argument("--backend", choices=("jax", "torch", "both"), default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (fewer when the budget ends)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the compile (default 2, smoke 1)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all rows")
    parser.add_argument("--min-row-s", type=float, default=None,
                        help="do not start a row with less left than this (default 30, smoke 0)")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "dot_product", "flash", "chunked"),
                        help="JAX attention kernel (auto: per platform, see models/attention.py resolve_kernel)")
    parser.add_argument("--remat-policy", default="full",
                        help="what the remat rows keep (jax_backend/models/blocks.py REMAT_POLICIES)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in this process, fp32")
    parser.add_argument("--isolate", choices=("row", "none"), default=None,
                        help="a fresh process per row (default) or all in this one (default with --smoke)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--carry", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.isolate = args.isolate or ("none" if args.smoke else "row")
    if args.min_row_s is None:
        args.min_row_s = 0.0 if args.smoke else 30.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # before JAX is imported: CPU only, and XLA's cheapest compile (smoke numbers mean nothing)
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                                   " --xla_llvm_disable_expensive_passes=true").strip()
    if args.child:
        cache = json.loads(args.carry)
        record = run_row(ROWS[args.child], args, args.deadline, cache)
        print(json.dumps({**record, "carry": {k: v for k, v in cache.items() if "/" in k or k.startswith("peak")}}),
              flush=True)
        return 0
    from jaxbooth.jax_backend.models.blocks import REMAT_POLICIES  # imports JAX, starts no device

    if args.remat_policy not in REMAT_POLICIES:
        print(f"bench_device: --remat-policy {args.remat_policy!r}; choose from {', '.join(REMAT_POLICIES)}",
              file=sys.stderr)
        return 2

    rows = select_rows(args.backend, args.rows)
    cache: dict = {}

    def runner(row: Row, deadline: float) -> dict:
        if args.isolate == "row":
            return run_isolated(row, args, deadline, cache)
        return run_row(row, args, deadline, cache)

    records = run_all(rows, runner, args.budget_s, args.min_row_s, lambda r: print(json.dumps(r), flush=True))
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
