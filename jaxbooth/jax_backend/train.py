"""`jaxbooth train --backend=jax`: DreamBooth on jaxbooth's Flax models, in phases.

resolve inputs -> load models -> encode caches -> mesh and shardings -> state ->
compile the step -> loop (log, checkpoint) -> export the pipeline. Each phase is a
function; the step itself is in ``train_step.py``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth import data, diffusion, output
from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import checkpoint, encode, optim, pretrained
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend.class_images import ensure_class_images
from jaxbooth.jax_backend.models import clip as clip_lib
from jaxbooth.jax_backend.models import unet as unet_lib
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL
from jaxbooth.jax_backend.train_step import LossOptions, TrainState, make_train_step, step_halves
from jaxbooth.jax_backend.validation import make_validator
from jaxbooth.progress import TrainingProgress
from jaxbooth.text import load_tokenizer, make_tokenize_fn

COMPUTE_DTYPES = {None: jnp.float32, "no": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


@dataclasses.dataclass
class RunInputs:
    """What the spec leaves open, decided once: model folder, data, seed, step counts."""

    spec: spec_lib.RunSpec
    model_dir: Path
    output_dir: Path
    dataset: data.Dataset
    seed: int
    max_train_steps: int


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[jaxbooth] {message}", file=sys.stderr, flush=True)


def configure_jax(spec: spec_lib.RunSpec) -> None:
    """Multi-host start-up and the persistent compilation cache (a relaunch skips compiling)."""
    par = spec.parallelism
    mesh_lib.initialize_distributed(par.coordinator_address, par.num_processes, par.process_id)
    from jaxbooth.tiny import default_cache_dir

    cache_dir = spec.precision.compilation_cache_dir or str(default_cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_inputs(spec: spec_lib.RunSpec) -> RunInputs:
    """The model folder (local or from the Hub cache), the dataset, the seed and the step count.

    The CLI has already filled in the built-in defaults (``cli.fill_defaults``).
    """
    from jaxbooth.hub import resolve_model_dir

    name, instance_dir = spec.model.pretrained_model_name_or_path, spec.data.instance_data_dir
    instance_prompt = spec.data.instance_prompt
    if name is None or instance_dir is None or not instance_prompt:
        raise JaxboothError("pretrained_model_name_or_path, instance_data_dir and instance_prompt must be set "
                            "(the CLI fills in the built-in defaults; call jaxbooth.cli.fill_defaults)")
    model_dir = resolve_model_dir(name, revision=spec.model.revision, variant=spec.model.variant,
                                  token=spec.hub.hub_token)
    prior = spec.prior
    seed = spec.optim.seed if spec.optim.seed is not None else 0
    class_dir = prior.class_data_dir if prior.with_prior_preservation else None
    if class_dir is not None:  # generate the shortfall first, resumably, as diffusers does
        ensure_class_images(model_dir, class_dir, prior.class_prompt, prior.num_class_images,
                            sample_batch_size=prior.sample_batch_size, precision=prior.prior_generation_precision,
                            seed=seed, variant=spec.model.variant, skip_bad=spec.data.skip_bad_images)
    dataset = data.make_dreambooth_dataset(instance_dir, instance_prompt, class_dir, prior.class_prompt,
                                           prior.num_class_images, skip_bad=spec.data.skip_bad_images)
    steps = spec_lib.total_train_steps(spec, len(dataset), jax.device_count())
    return RunInputs(spec, Path(model_dir), Path(spec.checkpointing.output_dir).absolute(), dataset, seed, steps)


def load_models(run: RunInputs) -> dict[str, Any]:
    """Configs, modules and host params of the UNet, VAE and text encoder."""
    spec = run.spec
    dtype = COMPUTE_DTYPES[spec.precision.mixed_precision]
    kernel = spec.precision.attention
    unet_config, unet_dict, unet_params = pretrained.load_pretrained(run.model_dir, "unet", variant=spec.model.variant,
                                                                     dtype=jnp.float32)
    vae_source = spec.model.pretrained_vae_name_or_path
    vae_dir = Path(vae_source) if vae_source else run.model_dir
    vae_config, _, vae_params = pretrained.load_pretrained(vae_dir, "vae", variant=spec.model.variant)
    text_config, text_dict, text_params = pretrained.load_pretrained(run.model_dir, "text_encoder",
                                                                     variant=spec.model.variant, dtype=jnp.float32)
    remat = spec.precision.gradient_checkpointing
    return {
        "unet": unet_lib.FlaxUNet2DConditionModel(unet_config, dtype=dtype, attention_kernel=kernel,
                                                  gradient_checkpointing=remat),
        "unet_config_dict": unet_dict, "unet_params": unet_params,
        "vae": FlaxAutoencoderKL(vae_config), "vae_config": vae_config, "vae_params": vae_params,
        "text_encoder": clip_lib.make_text_encoder(text_config, dtype=dtype, attention_kernel=kernel,
                                                   gradient_checkpointing=remat),
        "text_config_dict": text_dict, "text_params": text_params,
    }


def text_apply_fn(text_encoder) -> Any:
    return lambda variables, ids, mask: text_encoder.apply(variables, ids, mask).last_hidden_state


def build_caches(run: RunInputs, models: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """Latent posteriors of every image and token ids / embeddings of every prompt."""
    spec = run.spec
    posteriors = [encode.encode_latent_posteriors(models["vae"], models["vae_params"], run.dataset,
                                                  resolution=spec.data.resolution, center_crop=True, flip=flip)
                  for flip in ((False, True) if spec.data.random_flip else (False,))]
    if not spec.data.center_crop:
        _note_fixed_crops(run.dataset)
    mean = np.concatenate([p[0] for p in posteriors])
    std = np.concatenate([p[1] for p in posteriors])
    prompts = sorted({example.caption for example in run.dataset.examples})
    tokenizer = load_tokenizer(spec.model.tokenizer_name or run.model_dir, revision=spec.model.revision)
    tokenize = make_tokenize_fn(tokenizer, spec.model.tokenizer_max_length)
    input_ids, mask = tokenize(prompts)
    caches = {"latent_mean": mean, "latent_std": std}
    if spec.model.train_text_encoder:
        caches.update(input_ids=input_ids, attention_mask=mask)
    else:
        caches["text_embeddings"] = encode.encode_prompts(
            text_apply_fn(models["text_encoder"]), models["text_params"], tokenize, prompts,
            use_attention_mask=spec.model.text_encoder_use_attention_mask)
    return caches, prompts


def _note_fixed_crops(dataset: data.Dataset) -> None:
    """Random crops only matter for non-square images; with cached latents they are centred."""
    from PIL import Image

    non_square = [e.path.name for e in dataset.examples if (lambda size: size[0] != size[1])(Image.open(e.path).size)]
    if non_square:
        log(f"note: {len(non_square)} non-square image(s) (e.g. {non_square[0]}) are centre-cropped once for the "
            "latent cache instead of randomly cropped each step (as kohya does when caching latents)")


def make_optimizer(run: RunInputs):
    spec = run.spec
    lr = spec_lib.effective_learning_rate(spec, jax.device_count())
    schedule = optim.make_lr_schedule(spec.optim.lr_scheduler, learning_rate=lr,
                                      num_warmup_steps=spec.optim.lr_warmup_steps,
                                      num_training_steps=run.max_train_steps,
                                      num_cycles=spec.optim.lr_num_cycles, power=spec.optim.lr_power)
    tx = optim.make_optimizer(learning_rate_schedule=schedule, optimizer=spec.optim.optimizer,
                              adam_beta1=spec.optim.adam_beta1, adam_beta2=spec.optim.adam_beta2,
                              adam_epsilon=spec.optim.adam_epsilon, adam_weight_decay=spec.optim.adam_weight_decay,
                              max_grad_norm=spec.optim.max_grad_norm,
                              gradient_accumulation_steps=spec.optim.gradient_accumulation_steps)
    return tx, schedule


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


def global_rows(iterator: data.BatchIterator, epoch: int, position: int, prompt_index: dict[str, int]):
    """Latent-cache and prompt index of every row of the global batch: instance rows, then class rows.

    Flipped rows (``random_flip``) index the second, flipped half of the latent cache.
    """
    examples = iterator.dataset.examples
    plan = iterator.global_row_plan(epoch, position)
    cache_rows = [example + len(examples) * iterator.row_flip(epoch, slot, stream) for example, slot, stream in plan]
    prompts = [prompt_index[examples[example].caption] for example, _, _ in plan]
    return {"example_idx": np.asarray(cache_rows, np.int32), "prompt_idx": np.asarray(prompts, np.int32)}


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
    """
    frozen_shardings = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), frozen)
    batch_shardings = jax.tree_util.tree_map(lambda _: mesh_lib.batch_sharding(mesh), batch_example)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen, batch_example))
    start = time.perf_counter()
    if jax.default_backend() == "cpu":
        compiled = TwoPartStep(step_fn, shardings, frozen_shardings, batch_shardings, mesh, abstract)
    else:
        jitted = jax.jit(step_fn, in_shardings=(shardings, frozen_shardings, batch_shardings),
                         out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
        compiled = jitted.lower(*abstract).compile()
    return compiled, time.perf_counter() - start, batch_shardings, frozen_shardings


def put_batch(batch: dict[str, np.ndarray], shardings) -> dict:
    """Global host batch -> sharded device arrays; each process supplies the rows its devices hold."""
    return {key: jax.make_array_from_callback(value.shape, shardings[key], lambda index, v=value: v[index])
            for key, value in batch.items()}


def trained_params_host(state: TrainState) -> dict:
    """Params gathered to host numpy (works for sharded and multi-host arrays)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(state.params, tiled=True)
    return jax.device_get(state.params)


def export_trained(params_host: dict, models: dict, out_dir: Path, *, train_text_encoder: bool,
                   skip_text_encoder: bool = False) -> None:
    """Write trained components in diffusers' PyTorch layout (the only part that differs from the base)."""
    pretrained.save_diffusers_component(params_host["unet"], models["unet_config_dict"], out_dir, "unet")
    if train_text_encoder and not skip_text_encoder:
        pretrained.save_diffusers_component(params_host["text_encoder"], models["text_config_dict"], out_dir,
                                            "text_encoder")


def save_pipeline(run: RunInputs, models: dict, params_host: dict, steps_done: int) -> Path:
    """The final output folder: a loadable diffusers pipeline plus spec and model card."""
    spec, out = run.spec, run.output_dir
    train_te = spec.model.train_text_encoder
    export_trained(params_host, models, out, train_text_encoder=train_te,
                   skip_text_encoder=spec.checkpointing.skip_save_text_encoder)
    skip = {"unet"} | ({"text_encoder"} if train_te else set())
    if spec.checkpointing.skip_save_text_encoder:
        skip.add("text_encoder")
    output.copy_base_components(run.model_dir, out, skip=skip)
    vae_override = spec_lib.vae_name_or_path(spec)
    if vae_override:
        output.copy_base_components(Path(vae_override), out, skip=set(output.PIPELINE_COMPONENTS) - {"vae"})
    output.write_model_index(run.model_dir, out)
    base = spec.model.pretrained_model_name_or_path or "jaxbooth built-in tiny model"
    prompt = run.dataset.examples[run.dataset.instance_items[0]].caption
    output.atomic_write_text(out / "README.md", output.model_card(
        base_model=base, instance_prompt=prompt, train_text_encoder=train_te, steps=steps_done, backend="jax"))
    return out


def loss_options(spec: spec_lib.RunSpec, schedule: diffusion.NoiseSchedule, vae_config) -> LossOptions:
    return LossOptions(
        prediction_type=schedule.prediction_type, snr_gamma=spec.optim.snr_gamma,
        offset_noise=spec.optim.offset_noise, with_prior_preservation=spec.prior.with_prior_preservation,
        prior_loss_weight=spec.prior.prior_loss_weight, train_text_encoder=spec.model.train_text_encoder,
        text_encoder_use_attention_mask=spec.model.text_encoder_use_attention_mask,
        latent_scaling_factor=float(vae_config.scaling_factor),
        latent_shift_factor=float(getattr(vae_config, "shift_factor", None) or 0.0))


class Progress:
    """Progress line with loss, lr and steps/s; metrics to JSON lines. Host sync happens only here."""

    def __init__(self, run: RunInputs, total: int, start_step: int = 0):
        self.total = total
        self.metrics_log = output.MetricsLog(run.output_dir, enabled=jax.process_index() == 0)
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.tensorboard = _tensorboard_writer(run)
        self.wandb = _wandb_run(run)
        self.display = TrainingProgress(total, start_step, enabled=jax.process_index() == 0)

    def report(self, step: int, metrics: dict, *, window_start: int) -> None:
        values = {key: float(value) for key, value in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise JaxboothError(f"the loss became nan or inf somewhere within steps [{window_start}, {step}]; "
                                "lower --learning_rate, or use --mixed_precision=bf16 instead of fp16")
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        record = {"train/loss": values["loss"], "train/instance_loss": values["instance_loss"],
                  "train/prior_loss": values["prior_loss"], "train/lr": values["lr"],
                  "train/grad_norm": values["grad_norm"], "perf/steps_per_sec": rate}
        self.metrics_log.write(step, record)
        if self.tensorboard is not None:
            for key, value in record.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self.display.show(step, values["loss"], values["lr"], rate)


def _tensorboard_writer(run: RunInputs):
    if run.spec.logging.report_to not in ("tensorboard", "all") or jax.process_index() != 0:
        return None
    from jaxbooth.tensorboard import EventWriter  # torch-free: tensorboardX would import torch

    return EventWriter(run.output_dir / run.spec.logging.logging_dir)


def _wandb_run(run: RunInputs):
    if run.spec.logging.report_to not in ("wandb", "all") or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise JaxboothError("--report_to=wandb needs the wandb package: pip install wandb "
                            "(or use --report_to=tensorboard)") from None
    return wandb.init(project="jaxbooth", dir=str(run.output_dir), config=spec_lib.spec_to_dict(run.spec))


def train(spec: spec_lib.RunSpec) -> Path:
    """Run DreamBooth end to end on the JAX backend; returns the output pipeline folder."""
    configure_jax(spec)
    run = resolve_inputs(spec)
    models = load_models(run)
    noise_schedule = diffusion.load_schedule(run.model_dir)
    caches, prompts = build_caches(run, models)
    mesh = mesh_lib.make_mesh(spec_lib.mesh_shape(spec, jax.device_count()))
    # latents are cached: the VAE leaves device memory (validation keeps a host copy)
    validator = make_validator(spec, models, model_dir=run.model_dir, output_dir=run.output_dir,
                               vae_params=models.pop("vae_params"), seed=run.seed, mesh=mesh)
    params_host = {"unet": models.pop("unet_params")}
    if spec.model.train_text_encoder:
        params_host["text_encoder"] = models["text_params"]
    tx, lr_schedule = make_optimizer(run)
    state, shardings = init_state(params_host, tx, mesh, run.seed)
    del params_host
    accumulation = spec.optim.gradient_accumulation_steps
    iterator = data.BatchIterator(run.dataset, resolution=spec.data.resolution, batch_size=global_batch_size(spec),
                                  seed=run.seed, center_crop=True, random_flip=spec.data.random_flip)
    writer = checkpoint.CheckpointWriter(run.output_dir, keep=spec.checkpointing.checkpoints_total_limit)
    state, resumed_from = checkpoint.maybe_resume(spec, run.output_dir, state, shardings, iterator)
    if resumed_from:
        log(f"resumed from {resumed_from} at optimizer step {int(state.step) // accumulation}")
    step_fn = make_train_step(
        unet_apply=models["unet"].apply,
        text_apply=text_apply_fn(models["text_encoder"]) if spec.model.train_text_encoder else None,
        tx=tx, lr_schedule=lr_schedule, tables=noise_schedule.as_tables(),
        options=loss_options(spec, noise_schedule, models["vae_config"]),
        gradient_accumulation_steps=accumulation)
    prompt_index = {prompt: i for i, prompt in enumerate(prompts)}
    example_batch = global_rows(iterator, 0, 0, prompt_index)
    compiled, compile_seconds, batch_shardings, frozen_shardings = compile_step(
        step_fn, state, shardings, caches, example_batch, mesh)
    log(f"compiled the train step in {compile_seconds:.1f}s on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), mesh {dict(mesh.shape)}, global batch {global_batch_size(spec)}")
    frozen = jax.device_put(caches, frozen_shardings)
    state = run_loop(run, compiled, state, frozen, iterator, prompt_index, batch_shardings, writer, models,
                     validator)
    writer.wait()
    params_host = trained_params_host(state)
    steps_done = int(jax.device_get(state.step)) // accumulation
    if jax.process_index() == 0:
        out = save_pipeline(run, models, params_host, steps_done)
        spec_lib.write_resolved_spec(spec, out / output.SPEC_FILENAME)
        if spec.hub.push_to_hub:
            repo = output.push_to_hub(out, repo_id=spec.hub.hub_model_id, token=spec.hub.hub_token)
            log(f"pushed to the Hub: {repo}")
        log(f"done: {steps_done} optimizer steps; pipeline written to {out}")
    return run.output_dir


def run_loop(run: RunInputs, compiled, state: TrainState, frozen, iterator: data.BatchIterator,
             prompt_index: dict[str, int], batch_shardings, writer, models: dict, validator=None) -> TrainState:
    """Micro-steps until max_train_steps optimizer steps; syncs with the host only at log/save steps."""
    spec = run.spec
    accumulation = spec.optim.gradient_accumulation_steps
    total_micro = run.max_train_steps * accumulation
    micro = int(jax.device_get(state.step))
    progress = Progress(run, run.max_train_steps, start_step=micro // accumulation)
    log_every = max(1, spec.logging.log_every_steps)
    save_every = spec_lib.checkpoint_every_steps(spec)
    window_start = micro // accumulation + 1
    with checkpoint.StopOnSignal() as stop:
        while micro < total_micro:
            batch = global_rows(iterator, iterator.epoch, iterator.position, prompt_index)
            iterator.epoch, iterator.position = _next_position(iterator)
            state, metrics = compiled(state, frozen, put_batch(batch, batch_shardings))
            micro += 1
            if micro % accumulation:
                continue
            step = micro // accumulation
            progress.display.advance()
            if step % log_every == 0 or step == run.max_train_steps:
                progress.report(step, metrics, window_start=window_start)
                window_start = step + 1
            epochs_done = iterator.epoch if iterator.position == 0 else None
            if validator is not None and validator.should_run(step, epochs_done):
                validator.run(step, state.params["unet"], state.params.get("text_encoder"),
                              writer=progress.tensorboard)
            if (save_every and step % save_every == 0) or stop.requested:
                writer.save(step, state, iterator.state_dict(), spec,
                            export=lambda path, params: export_trained(
                                params, models, path, train_text_encoder=spec.model.train_text_encoder),
                            gather=trained_params_host)
            if stop.requested:
                writer.wait()
                progress.display.close()
                log(f"stopped by signal after step {step}; resume with --resume_from_checkpoint=latest")
                raise SystemExit(0)
    progress.display.close()
    return state


def _next_position(iterator: data.BatchIterator) -> tuple[int, int]:
    if iterator.position + 1 < iterator.num_batches_per_epoch:
        return iterator.epoch, iterator.position + 1
    return iterator.epoch + 1, 0
