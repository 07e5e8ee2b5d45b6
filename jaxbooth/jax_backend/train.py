"""`jaxbooth train --backend=jax`: DreamBooth on jaxbooth's Flax models, in phases.

configure jax -> mesh -> refuse what this backend cannot train (options, then the pipeline
class, before any weight loads; ``loading.py``) -> load every model once (``LoadedModels``)
-> class images -> dataset -> caches (``caches.py``) -> state -> compile the step -> loop
(log, checkpoint, validate; ``metrics.py``) -> export the pipeline. Each phase is a function;
the step itself is in ``train_step.py``.

LoRA (``use_lora``) changes what the state trains, not the phases: the state holds the
adapters (``lora.py``), the base params ride beside the caches as ``frozen["base"]`` with the
fsdp shardings trained params would get, the step merges the two, and checkpoints and the
output hold the LoRA file instead of ``unet/`` (``jaxbooth.lora.outputs``).

``train_text_encoder`` trains every text encoder of the pipeline (SDXL: both, as diffusers' SDXL
script), each its own optimizer param group at ``text_encoder_lr``; the step then encodes the
cached token ids through them (``train_step.text_conditioning``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth import data, ema, output, sdxl
from jaxbooth import log as jaxbooth_log
from jaxbooth import loss_options as loss_lib
from jaxbooth import spec as spec_lib
from jaxbooth.host_memory import release_freed_memory
from jaxbooth.jax_backend import bucket_steps, checkpoint, encode, loading, optim, pretrained
from jaxbooth.jax_backend import caches as caches_lib
from jaxbooth.jax_backend import lora as lora_lib
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend.class_images import ensure_class_images
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.loading import COMPUTE_DTYPES, text_apply_fn
from jaxbooth.jax_backend.metrics import Progress
from jaxbooth.jax_backend.train_step import LossOptions, TrainState, make_train_step, step_halves
from jaxbooth.jax_backend.validation import make_validator
from jaxbooth.lora import AdapterSettings

__all__ = ["COMPUTE_DTYPES", "RunInputs", "TwoPartStep", "adapter_settings", "compile_step", "components_to_save",
           "frozen_shardings", "init_state", "initial_params", "make_optimizer", "prepare_inputs", "run_loop",
           "run_optimizer", "save_pipeline", "sdxl_trainable_mask", "step_text_apply", "text_apply_fn", "train",
           "trained_text_encoders", "validation_text_params"]


@dataclasses.dataclass
class RunInputs:
    """What the spec leaves open, decided once the models are loaded: data, seed, step count."""

    spec: spec_lib.RunSpec
    model_dir: Path
    output_dir: Path
    dataset: data.Dataset
    seed: int
    max_train_steps: int


def log(message: str) -> None:
    if jax.process_index() == 0:
        jaxbooth_log.info(message)


def configure_jax(spec: spec_lib.RunSpec) -> None:
    """Multi-host start-up and the persistent compilation cache (a relaunch skips compiling)."""
    mesh_lib.initialize_distributed(spec)  # a no-op when the CLI's backend choice already joined
    from jaxbooth.tiny import default_cache_dir

    cache_dir = spec.precision.compilation_cache_dir or str(default_cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # random bits independent of how arrays are sharded (the default since JAX 0.5; pinned for older ones)
    jax.config.update("jax_threefry_partitionable", True)


def prepare_inputs(spec: spec_lib.RunSpec, models: LoadedModels, instances: data.Dataset | None = None) -> RunInputs:
    """Class images (the shortfall, generated with the loaded models), then the dataset and step count.

    The CLI has already filled in the built-in defaults (``run_defaults.fill_defaults``).
    """
    prior = spec.prior
    seed = spec.optim.seed if spec.optim.seed is not None else 0
    if prior.with_prior_preservation and prior.class_data_dir is not None:
        ensure_class_images(models.model_dir, prior.class_data_dir, prior.class_prompt, prior.num_class_images,
                            sample_batch_size=prior.sample_batch_size, precision=prior.prior_generation_precision,
                            seed=seed, variant=spec.model.variant, skip_bad=spec.data.skip_bad_images, models=models)
    dataset = data.dataset_from_spec(spec, instances=instances)
    steps = spec_lib.total_train_steps(spec, len(dataset), jax.device_count())
    return RunInputs(spec, models.model_dir, Path(spec.checkpointing.output_dir).absolute(), dataset, seed, steps)


def trained_text_encoders(spec: spec_lib.RunSpec, is_sdxl: bool) -> tuple[str, ...]:
    """The text encoders a run trains: none, SD's one, or with ``train_text_encoder`` on SDXL both
    (diffusers' SDXL script adapts and optimizes ``text_encoder_one`` and ``text_encoder_two``)."""
    if not spec.model.train_text_encoder:
        return ()
    return sdxl.TEXT_ENCODERS if is_sdxl else ("text_encoder",)


def adapter_settings(spec: spec_lib.RunSpec, models: LoadedModels) -> AdapterSettings:
    """The run's LoRA settings; on SDXL with ``train_text_encoder`` both encoders get adapters."""
    return AdapterSettings.from_spec(spec, sdxl=models.is_sdxl)


def sdxl_trainable_mask(spec: spec_lib.RunSpec, models: LoadedModels) -> Callable[[dict], Any] | None:
    """With SDXL's encoders trained, ``encode.sdxl_trainable_mask`` (the first encoder's leaves past the
    penultimate hidden states feed nothing; torch's AdamW skips them for want of a grad); else None."""
    if not (models.is_sdxl and spec.model.train_text_encoder):
        return None
    return encode.sdxl_trainable_mask(int(models.text_config_dict["num_hidden_layers"]))


def make_optimizer(run: RunInputs, *, text_encoders: tuple[str, ...] | None = None,
                   trainable_mask: Callable[[dict], Any] | None = None):
    """The optax update and the UNet's LR schedule; each trained text encoder is its own param group.

    All groups follow one schedule shape (one torch LambdaLR over the groups); the text encoders
    take ``text_encoder_lr`` and ``adam_weight_decay_text_encoder`` (None: the UNet's values), as
    diffusers' scripts give each its own group. ``text_encoders``: the trained ones (default: from
    the spec and the pipeline, :func:`trained_text_encoders`); ``trainable_mask``: see
    :func:`sdxl_trainable_mask`.
    """
    spec, o = run.spec, run.spec.optim
    if text_encoders is None:
        text_encoders = trained_text_encoders(spec, sdxl.is_sdxl_pipeline(run.model_dir))
    unet_lr = spec_lib.effective_learning_rate(spec, jax.device_count())
    schedule_for = functools.partial(optim.make_lr_schedule, o.lr_scheduler, num_warmup_steps=o.lr_warmup_steps,
                                     num_training_steps=run.max_train_steps, num_cycles=o.lr_num_cycles,
                                     power=o.lr_power, optimizer_learning_rate=unet_lr)
    schedule = schedule_for(learning_rate=unet_lr)
    groups = None
    if text_encoders:
        decay = o.adam_weight_decay if o.adam_weight_decay_text_encoder is None else o.adam_weight_decay_text_encoder
        text_lr = spec_lib.effective_text_encoder_learning_rate(spec, jax.device_count())
        group = optim.ParamGroup(schedule_for(learning_rate=text_lr), decay)
        groups = {name: group for name in text_encoders}
    tx = optim.make_optimizer(learning_rate_schedule=schedule, optimizer=o.optimizer, adam_beta1=o.adam_beta1,
                              adam_beta2=o.adam_beta2, adam_epsilon=o.adam_epsilon,
                              adam_weight_decay=o.adam_weight_decay, max_grad_norm=o.max_grad_norm,
                              gradient_accumulation_steps=o.gradient_accumulation_steps, param_groups=groups,
                              trainable_mask=trainable_mask, ema_decay=o.ema_decay if o.use_ema else None)
    return tx, schedule


def run_optimizer(run: RunInputs, models: LoadedModels):
    """:func:`make_optimizer` for the loaded pipeline: its trained text encoders, and SDXL's trainable mask."""
    return make_optimizer(run, text_encoders=trained_text_encoders(run.spec, models.is_sdxl),
                          trainable_mask=sdxl_trainable_mask(run.spec, models))


def initial_params(spec: spec_lib.RunSpec, models: LoadedModels, seed: int) -> tuple[dict, dict | None]:
    """(what the state trains, the frozen base or None): the UNet (and the trained text encoders) as
    they are, or with ``use_lora`` their adapters (``lora.init_adapters``) over those weights."""
    weights = {"unet": models.unet_params}
    text_params = {"text_encoder": models.text_params, "text_encoder_2": models.text_params_2}
    for name in trained_text_encoders(spec, models.is_sdxl):
        weights[name] = text_params[name]
    if not spec.lora.use_lora:
        return weights, None
    settings = adapter_settings(spec, models)
    adapters = lora_lib.init_adapters(weights, settings, seed)
    layers = sum(len(lora_lib.to_lora_state({c: a}, settings)[c]) for c, a in adapters.items())
    log(f"{'DoRA' if settings.use_dora else 'LoRA'} rank {settings.rank}, alpha {settings.alpha:g}: {layers} adapted "
        f"layers in {', '.join(adapters)}, {lora_lib.count_adapter_params(adapters):,} trained params")
    return adapters, weights


def frozen_shardings(frozen: dict, mesh) -> dict:
    """Caches replicated; the frozen base params (LoRA, ``frozen["base"]``) by the fsdp rules, as
    trained params would be, so a model that needs fsdp to fit still fits."""
    replicated = mesh_lib.replicated(mesh)
    shardings = {key: jax.tree_util.tree_map(lambda _: replicated, value) for key, value in frozen.items()}
    if "base" in frozen:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen["base"])
        shardings["base"] = mesh_lib.param_shardings(abstract, mesh)
    return shardings


def init_state(params_host: dict, tx, mesh, seed: int) -> tuple[TrainState, Any]:
    """Place params straight into their shardings, then build the optimizer state sharded alike."""
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_host)
    param_shardings = mesh_lib.param_shardings(abstract, mesh)
    params = jax.device_put(params_host, param_shardings)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    opt_shardings = mesh_lib.param_shardings(opt_abstract, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = mesh_lib.replicated(mesh)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=opt_state, rng=jax.device_put(jax.random.key_data(jax.random.PRNGKey(seed)),
                                                               replicated))
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)
    return state, shardings


def log_placement(state: TrainState, mesh) -> None:
    """What each device holds of the trained params and optimizer state, read from the arrays' shards;
    with fsdp the table per parameter group too (what is sharded, and what it costs per device)."""
    held, whole = mesh_lib.bytes_on_device((state.params, state.opt_state))
    log(f"params + optimizer state: {held / 1e6:.2f} MB per device of {whole / 1e6:.2f} MB "
        f"(1/{whole / max(held, 1):.2f}), mesh {dict(mesh.shape)}")
    if mesh.shape[mesh_lib.FSDP_AXIS] > 1:
        log("sharding of the trained params:\n" + mesh_lib.sharding_table(state.params))


def global_batch_size(spec: spec_lib.RunSpec) -> int:
    """train_batch_size is per device, as in diffusers' Flax script (x local_device_count)."""
    return spec.optim.train_batch_size * jax.device_count()


class TwoPartStep:
    """The train step as two executables, gradients then update, for XLA:CPU.

    Why: compiling a whole SD-shaped train step on CPU holds ~1.2 GB (XLA's fusion emitters
    over the UNet's backward pass and ~700 per-leaf optimizer updates), most of a small run's
    peak memory. Compiled apart, the gradient half with the older loop emitters and the
    update half with the defaults, the peak compile footprint is about a third, the step
    takes the same time, and the compile a few seconds longer. Same math as ``train_step``.
    """

    GRADIENT_OPTIONS = {"xla_cpu_use_fusion_emitters": False}

    def __init__(self, step_fn, shardings, frozen_shardings, batch_shardings, mesh, abstract):
        grads_fn, update_fn = step_halves(step_fn)
        state, frozen, batch = abstract
        replicated = mesh_lib.replicated(mesh)
        grads_jit = jax.jit(grads_fn, in_shardings=(shardings, frozen_shardings, batch_shardings),
                            out_shardings=(shardings.params, replicated))
        self.grads = grads_jit.lower(state, frozen, batch).compile(compiler_options=self.GRADIENT_OPTIONS)
        grads_abstract, losses_abstract = self.grads.out_info  # no second trace of the backward pass
        update_jit = jax.jit(update_fn, in_shardings=(shardings, shardings.params, replicated),
                             out_shardings=(shardings, replicated), donate_argnums=(0,))
        self.update = update_jit.lower(state, grads_abstract, losses_abstract).compile()

    def __call__(self, state: TrainState, frozen, batch) -> tuple[TrainState, dict]:
        grads, losses = self.grads(state, frozen, batch)
        return self.update(state, grads, losses)

    def cost_analysis(self) -> list:
        return [self.grads.cost_analysis(), self.update.cost_analysis()]

    def memory_analysis(self):
        return self.grads.memory_analysis()  # the half with the activations


def compile_step(step_fn, state, shardings, frozen, batch_example, mesh):
    """Lower and compile before the loop, so shape errors come first and compile time is its own figure.

    One executable, except on CPU (``TwoPartStep``); both are called ``step(state, frozen, batch)``.
    ``frozen`` is already on the devices, in :func:`frozen_shardings`.
    """
    frozen_placement = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    batch_shardings = jax.tree_util.tree_map(lambda _: mesh_lib.batch_sharding(mesh), batch_example)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen, batch_example))
    start = time.perf_counter()
    if jax.default_backend() == "cpu":
        compiled = TwoPartStep(step_fn, shardings, frozen_placement, batch_shardings, mesh, abstract)
    else:
        jitted = jax.jit(step_fn, in_shardings=(shardings, frozen_placement, batch_shardings),
                         out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
        compiled = jitted.lower(*abstract).compile()
    return compiled, time.perf_counter() - start, batch_shardings


def put_batch(batch: dict[str, np.ndarray], shardings) -> dict:
    """Global host batch -> sharded device arrays; each process supplies the rows its devices hold."""
    return {key: jax.make_array_from_callback(value.shape, shardings[key], lambda index, v=value: v[index])
            for key, value in batch.items()}


def trained_params_host(state: TrainState, use_ema: bool = False) -> dict:
    """Params (``use_ema``: their EMA, ``optim.output_params``) gathered to host numpy (works for sharded and
    multi-host arrays)."""
    params = optim.output_params(state.params, state.opt_state, use_ema)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def export_trained(params_host: dict, models: LoadedModels, out_dir: Path, components: tuple[str, ...]) -> None:
    """Write trained components in diffusers' PyTorch layout (the only part that differs from the base)."""
    configs = {"unet": models.unet_config_dict, "text_encoder": models.text_config_dict,
               "text_encoder_2": models.text_config_dict_2}
    for component in components:
        pretrained.save_diffusers_component(params_host[component], configs[component], out_dir, component)


def trained_components(spec: spec_lib.RunSpec, is_sdxl: bool = False) -> tuple[str, ...]:
    """What a checkpoint holds in diffusers' layout: every trained component, saved or not at the end."""
    return ("unet", *trained_text_encoders(spec, is_sdxl))


def components_to_save(spec: spec_lib.RunSpec, is_sdxl: bool) -> tuple[str, ...]:
    """What the final pipeline gets from the trained params: ``output.components_to_save``, and SDXL's
    second encoder beside the first (``skip_save_text_encoder`` is refused for SDXL)."""
    saved = output.components_to_save(spec)
    return (*saved, sdxl.TEXT_ENCODERS[1]) if is_sdxl and sdxl.TEXT_ENCODERS[0] in saved else saved


def save_pipeline(run: RunInputs, models: LoadedModels, params_host: dict, steps_done: int,
                  validation_images: tuple[str, ...] = ()) -> Path:
    """The final output folder: the shared ``output.write_pipeline`` around the trained components,
    or with LoRA the shared ``lora.outputs.write_lora_output`` around the adapters."""
    spec, out = run.spec, run.output_dir
    prompt = run.dataset.examples[run.dataset.instance_items[0]].caption
    if spec.lora.use_lora:
        from jaxbooth.lora import outputs as lora_outputs

        settings = adapter_settings(spec, models)
        return lora_outputs.write_lora_output(
            out, lora_lib.to_lora_state(params_host, settings), settings=settings, spec=spec,
            base_dir=models.model_dir, vae_dir=models.vae_dir, steps=steps_done, backend="jax",
            instance_prompt=prompt, validation_images=validation_images)
    saved = components_to_save(spec, models.is_sdxl)
    export_trained(params_host, models, out, saved)
    return output.write_pipeline(out, base_dir=models.model_dir, trained_components=saved, vae_dir=models.vae_dir,
                                 spec=spec, steps=steps_done, backend="jax", instance_prompt=prompt,
                                 validation_images=validation_images)


def step_text_apply(spec: spec_lib.RunSpec, models: LoadedModels, row_ids: bool = False) -> Callable | None:
    """The step's ``text_apply`` (``train_step.text_conditioning``): None with frozen encoders (cached
    embeddings) unless rows carry token ids (``caches.Caches.row_ids``), SDXL's ``encode.sdxl_conditioning``
    of both encoders, or SD's last hidden state."""
    if not (spec.model.train_text_encoder or row_ids):
        return None
    if models.is_sdxl:
        return functools.partial(encode.sdxl_conditioning, (models.text_encoder, models.text_encoder_2))
    return text_apply_fn(models.text_encoder)


def loss_options(spec: spec_lib.RunSpec, models: LoadedModels) -> LossOptions:
    schedule, vae_config = models.noise_schedule, models.vae_config
    return LossOptions(
        prediction_type=schedule.prediction_type, snr_gamma=spec.optim.snr_gamma,
        offset_noise=spec.optim.offset_noise, with_prior_preservation=spec.prior.with_prior_preservation,
        prior_loss_weight=spec.prior.prior_loss_weight, train_text_encoder=spec.model.train_text_encoder,
        text_encoder_use_attention_mask=spec.model.text_encoder_use_attention_mask,
        latent_scaling_factor=float(vae_config.scaling_factor),
        latent_shift_factor=sdxl.latent_shift(getattr(vae_config, "shift_factor", None), models.is_sdxl),
        **loss_lib.spec_loss_options(spec.optim))


def load_for_training(spec: spec_lib.RunSpec) -> LoadedModels:
    """Refuse what this backend cannot train (model_index.json only), then load every model once."""
    return loading.load_models(spec, loading.resolve_model_paths(spec))


def train(spec: spec_lib.RunSpec) -> Path:
    """Run DreamBooth end to end on the JAX backend; returns the output folder."""
    configure_jax(spec)
    mesh = mesh_lib.make_mesh(spec_lib.mesh_shape(spec, jax.device_count()))
    loading.refuse_unsupported_options(spec)
    paths = loading.resolve_model_paths(spec)  # refuses an untrainable pipeline from model_index.json alone
    instances = data.instance_dataset(spec)  # a missing or broken image source fails before any model loads
    models = loading.load_models(spec, paths)
    run = prepare_inputs(spec, models, instances)
    # what this run trains on and validates with (class images came from the base's): --zero_terminal_snr
    models.noise_schedule = loss_lib.training_schedule(models.noise_schedule, spec.optim.zero_terminal_snr)
    models.scheduler_config = loss_lib.training_scheduler_config(models.scheduler_config, spec.optim.zero_terminal_snr)
    buckets = bucket_steps.plan(spec, models, run.dataset)  # None without enable_bucket
    caches = caches_lib.build_caches(spec, models, run.dataset, run.seed, buckets)
    crops = "centre crops" if spec.data.center_crop else f"up to {caches_lib.CROPS_PER_IMAGE} random crops each"
    log(f"cached {caches.num_latent_rows} latent posteriors of {len(run.dataset.examples)} images ({crops}"
        f"{', both orientations' if spec.data.random_flip else ''})")
    validator = make_validator(spec, models, output_dir=run.output_dir, seed=run.seed, mesh=mesh)
    models.vae_params = None  # latents are cached: the VAE leaves memory (validation keeps a host copy)
    params_host, base_host = initial_params(spec, models, run.seed)
    tx, lr_schedule = run_optimizer(run, models)
    state, shardings = init_state(params_host, tx, mesh, run.seed)
    log_placement(state, mesh)
    if spec.optim.use_ema:
        log(ema.EMA_LOG.format(decay=spec.optim.ema_decay))
    # the state (and frozen["base"]) hold them; a frozen encoder's embeddings are cached
    models.unet_params = models.text_params = models.text_params_2 = params_host = None
    iterator = data.BatchIterator(run.dataset, resolution=spec.data.resolution, batch_size=global_batch_size(spec),
                                  seed=run.seed, center_crop=spec.data.center_crop, random_flip=spec.data.random_flip,
                                  interpolation=spec.data.image_interpolation_mode, buckets=buckets)
    writer = checkpoint.CheckpointWriter(run.output_dir, keep=spec.checkpointing.checkpoints_total_limit)
    state, resumed_from = checkpoint.maybe_resume(spec, run.output_dir, state, shardings, iterator)
    accumulation = spec.optim.gradient_accumulation_steps
    if resumed_from:
        log(f"resumed from {resumed_from} at optimizer step {int(state.step) // accumulation}")
    step_fn = make_train_step(
        unet_apply=models.unet.apply,
        text_apply=step_text_apply(spec, models, caches.row_ids),
        tx=tx, lr_schedule=lr_schedule, tables=models.noise_schedule.as_tables(),
        options=loss_options(spec, models), gradient_accumulation_steps=accumulation,
        merge=None if base_host is None else lora_lib.step_merge(adapter_settings(spec, models).scale))
    tokenize = caches_lib.row_tokenizer(spec, models) if caches.row_ids else None  # shuffled captions, encoded per row
    rows = functools.partial(caches_lib.global_rows, prompt_index={p: i for i, p in enumerate(caches.prompts)},
                             latent_index=caches.latent_index, tokenize=tokenize)
    frozen_host = caches.frozen if base_host is None else {**caches.frozen, "base": base_host}
    frozen = jax.device_put(frozen_host, frozen_shardings(frozen_host, mesh))
    if buckets is not None:  # one step per bucket shape, compiled when its first batch comes (bucket_steps.py)
        compiled = bucket_steps.BucketSteps.build(step_fn, state, shardings, frozen, caches, mesh, log=log,
                                                  compile_step=compile_step, frozen_shardings=frozen_shardings,
                                                  tokenize=tokenize)
        rows, batch_shardings = compiled.rows, compiled.batch_shardings
    del caches, frozen_host, base_host  # the host copies; the device holds them now
    jax.clear_caches()  # the VAE / text-encoder cache builders' executables are never run again (~50 MB on SDXL-small)
    release_freed_memory()  # the caches' scratch and the host copies, before the compile stacks on top
    if buckets is None:
        compiled, compile_seconds, batch_shardings = compile_step(step_fn, state, shardings, frozen,
                                                                  rows(iterator, 0, 0), mesh)
        release_freed_memory()  # the compile's scratch, before the steps' buffers
        log(f"compiled the train step in {compile_seconds:.1f}s on {jax.device_count()} {jax.devices()[0].platform} "
            f"device(s), mesh {dict(mesh.shape)}, global batch {global_batch_size(spec)}")
    state = run_loop(run, compiled, state, frozen, iterator, rows, batch_shardings, writer, models, validator)
    writer.wait()
    return _finish(run, models, state, tuple(validator.written) if validator is not None else ())


def _finish(run: RunInputs, models: LoadedModels, state: TrainState, validation_images: tuple[str, ...]) -> Path:
    """Gather the trained params and write the pipeline, resolved spec and (optionally) the Hub upload."""
    spec = run.spec
    params_host = trained_params_host(state, spec.optim.use_ema)
    steps_done = int(jax.device_get(state.step)) // spec.optim.gradient_accumulation_steps
    if spec.optim.use_ema:
        log(f"writing the EMA weights (after {steps_done} optimizer steps) as the output")
    if jax.process_index() == 0:
        out = save_pipeline(run, models, params_host, steps_done, validation_images)
        if spec.hub.push_to_hub:
            repo = output.push_to_hub(out, repo_id=spec.hub.hub_model_id, token=spec.hub.hub_token)
            log(f"pushed to the Hub: {repo}")
        log(f"done: {steps_done} optimizer steps; {'LoRA' if spec.lora.use_lora else 'pipeline'} written to {out}")
    return run.output_dir


def run_loop(run: RunInputs, compiled, state: TrainState, frozen, iterator: data.BatchIterator,
             rows: Callable[..., dict], batch_shardings, writer, models: LoadedModels,
             validator=None) -> TrainState:
    """Micro-steps until max_train_steps optimizer steps; syncs with the host only at log/save steps.

    ``rows(iterator, epoch, position)`` is the global batch of cache indices (``caches.global_rows``).
    """
    spec = run.spec
    accumulation = spec.optim.gradient_accumulation_steps
    total_micro = run.max_train_steps * accumulation
    micro = int(jax.device_get(state.step))
    progress = Progress(spec, run.output_dir, run.max_train_steps, start_step=micro // accumulation)
    log_every = max(1, spec.logging.log_every_steps)
    save_every = spec_lib.checkpoint_every_steps(spec)
    export, model_params = _exporter(spec, models), _model_params(spec, frozen)
    with checkpoint.PreemptionWatch() as preemption:
        while micro < total_micro:
            if micro % accumulation == 0:
                epoch_before = iterator.epoch  # an epoch may end inside an accumulation window
            batch = rows(iterator, iterator.epoch, iterator.position)
            iterator.epoch, iterator.position = iterator.next_key((iterator.epoch, iterator.position))
            state, metrics = compiled(state, frozen, put_batch(batch, batch_shardings))
            micro += 1
            if micro % accumulation:
                continue
            step = micro // accumulation
            progress.display.advance()
            if step % log_every == 0 or step == run.max_train_steps:
                progress.report(step, metrics)
            epochs_done = iterator.epoch if iterator.epoch > epoch_before else None
            if validator is not None and validator.should_run(step, epochs_done):
                params = model_params(optim.output_params(state.params, state.opt_state, spec.optim.use_ema))
                validator.run(step, params["unet"], validation_text_params(params), writer=progress.tensorboard)
            stop = preemption.requested(step)
            if (save_every and step % save_every == 0) or stop:
                writer.save(step, state, iterator.state_dict(), spec, seed=run.seed, export=export,
                            gather=trained_params_host)
            if stop:
                writer.wait()
                progress.display.close()
                log(f"stopped by signal after step {step}; resume with --resume_from_checkpoint=latest")
                raise checkpoint.TrainingStopped(step)
    progress.display.close()
    return state


def validation_text_params(params: dict) -> Any:
    """The trained text encoders' params for the validator, None when frozen (it keeps its own copy):
    SD's one tree, or SDXL's two as a tuple in ``sdxl.TEXT_ENCODERS`` order."""
    if sdxl.TEXT_ENCODERS[1] in params:
        return tuple(params[name] for name in sdxl.TEXT_ENCODERS)
    return params.get("text_encoder")


def _model_params(spec: spec_lib.RunSpec, frozen: dict) -> Callable[[dict], dict]:
    """The trained params -> the params the models apply (LoRA: merged into the base, one jitted call)."""
    if not spec.lora.use_lora:
        return lambda params: params
    merger = lora_lib.make_merger(AdapterSettings.from_spec(spec).scale)
    return lambda adapters: merger(frozen["base"], adapters)


def _exporter(spec: spec_lib.RunSpec, models: LoadedModels) -> Callable[[Path, dict], None]:
    """What a checkpoint holds beside the orbax state: the trained components in diffusers' layout,
    or with LoRA the LoRA file (loadable with ``pipe.load_lora_weights(".../checkpoint-N")``)."""
    if spec.lora.use_lora:  # the file takes rank, alpha and targets from the settings, its components from the adapters
        return functools.partial(_export_lora_checkpoint, settings=AdapterSettings.from_spec(spec))
    return functools.partial(_export_checkpoint, models=models, spec=spec)


def _export_checkpoint(path: Path, params: dict, *, models: LoadedModels, spec: spec_lib.RunSpec) -> None:
    export_trained(params, models, path, trained_components(spec, models.is_sdxl))


def _export_lora_checkpoint(path: Path, adapters: dict, *, settings: AdapterSettings) -> None:
    from jaxbooth.lora import outputs as lora_outputs

    lora_outputs.write_checkpoint_lora(path, lora_lib.to_lora_state(adapters, settings), settings)
