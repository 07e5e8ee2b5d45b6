"""`jaxbooth train --backend=torch`: DreamBooth on diffusers' torch models through accelerate.

The torch backend carries what only exists on GPUs today (xFormers, bitsandbytes 8-bit Adam,
DeepSpeed ZeRO offload) and shares everything else with the JAX backend: the run spec, the
data pipeline (``jaxbooth.data``), the loss math (``jaxbooth.diffusion``), the output folder
(``jaxbooth.output``) and the checkpoint layout (``jaxbooth.checkpoints``). It never imports
jax, flax, optax, orbax or ``jaxbooth.jax_backend`` (tests/torch_backend checks this).

An SDXL pipeline (``model_index.json``: ``StableDiffusionXLPipeline``) trains its UNet, full or
LoRA, as diffusers' ``train_dreambooth_lora_sdxl.py``: the UNet also gets the pooled prompt embeds
and each row's time ids (``inputs.SdxlTextConditioner``). Both text encoders are frozen and their
embeddings cached, or with ``--train_text_encoder`` both trained (LoRA adapters or full weights) as
one module (``models.SdxlTextEncoders``) that encodes every batch's prompts.

A DeepFloyd IF pipeline (``IFPipeline``, ``IFSuperResolutionPipeline``) trains in pixel space
(``inputs.PixelSource``: no VAE), on the noise half of its learned-variance output; stage II's UNet
also sees the low-resolution crop upscaled and noised to a random level that is its class label, as
``IFSuperResolutionPipeline`` feeds it (``deepfloyd.UpscalerConditioning``; diffusers' script instead
passes the denoising timestep and a copy of the noisy input). Options IF does not take are refused by
``jaxbooth.deepfloyd.option_problems`` before any model loads.

Phases: accelerator -> class images -> dataset, tokenizer(s), models -> with
``pre_compute_text_embeddings``, every prompt encoded and the text encoders freed (so T5 never shares
the device with the prepared UNet and its optimizer) -> memory options -> LoRA adapters (``--use_lora``,
``lora.py``) -> optimizer, LR schedule, ``accelerator.prepare`` -> resume -> loop (``loop.py``) ->
pipeline (or, for LoRA, ``pytorch_lora_weights.safetensors``; ``finish.py``).

Launching:

* one process (one GPU or the CPU)::

    jaxbooth train --backend=torch --pretrained_model_name_or_path=... --instance_data_dir=... \\
        --instance_prompt="a photo of sks dog" --output_dir=out

* several processes (data parallel, one per GPU), with accelerate's launcher::

    accelerate launch --num_processes=2 -m jaxbooth train --backend=torch ...

* the diffusers guide's 8 GB recipe (DeepSpeed ZeRO-2, optimizer state offloaded to the CPU)::

    accelerate launch --config_file scripts/accelerate_deepspeed_zero2_offload.yaml \\
        -m jaxbooth train --backend=torch ...

``train_batch_size`` is per process, as in diffusers; each process reads its own slice of
every global batch from the shared ``BatchIterator``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from jaxbooth import data, deepfloyd, edm, ema, output, pipelines, sample_prompts, sdxl
from jaxbooth import log as jaxbooth_log
from jaxbooth import loss_options as loss_lib
from jaxbooth import spec as spec_lib
from jaxbooth.checkpoints import clear_incomplete
from jaxbooth.errors import JaxboothError
from jaxbooth.lora import AdapterSettings
from jaxbooth.text import load_tokenizer, make_tokenize_fn
from jaxbooth.torch_backend import checkpoint, class_images, lora, memory, models, optim
from jaxbooth.torch_backend.deepfloyd import UpscalerConditioning
from jaxbooth.torch_backend.finish import make_validator, save_lora, save_pipeline
from jaxbooth.torch_backend.inputs import LatentCache, PixelSource, SdxlTextConditioner, TextConditioner, disk_stores
from jaxbooth.torch_backend.loop import Trainer, log, run_loop
from jaxbooth.torch_backend.loss import LossOptions, edm_schedule
from jaxbooth.torch_backend.samples import make_sample_hook

__all__ = ["RunInputs", "build_trainer", "check_supported", "make_validator", "save_lora", "save_pipeline",
           "start_run", "train"]


@dataclasses.dataclass
class RunInputs:
    """What the spec leaves open, decided once."""

    spec: spec_lib.RunSpec
    model_dir: Path
    vae_dir: Path | None
    output_dir: Path
    seed: int
    instances: data.Dataset | None = None  # the instance images, read once before anything loads


def check_supported(spec: spec_lib.RunSpec, model_dir: Path) -> None:
    """Refuse, naming them, the options (capability table, planned ones included) and the pipeline
    class (``model_index.json``) the torch backend does not train; the DeepFloyd IF keys on every
    pipeline (stage II's on any other, IF's refusals on IF: ``deepfloyd.option_problems``)."""
    spec_lib.check_backend(spec, "torch")
    pipeline_class = pipelines.refuse_untrainable_pipeline(model_dir, "torch", spec.model.model_family)
    if sdxl.is_sdxl_pipeline(model_dir):
        refuse_sdxl_options(spec, model_dir)
    problems = deepfloyd.option_problems(spec, pipeline_class)
    problems += edm.pipeline_problems(model_dir, spec.sdxl.do_edm_style_training, "torch",
                                      snr_gamma=spec.optim.snr_gamma)
    problems += edm_loss_problems(spec, model_dir)
    if problems:
        raise JaxboothError("\n".join(problems))


def edm_loss_problems(spec: spec_lib.RunSpec, model_dir: Path) -> list[str]:
    """The DDPM-schedule loss options an EDM-style run cannot take (its loss is on sigmas, not betas/SNR)."""
    if edm.training_scheduler(model_dir, spec.sdxl.do_edm_style_training) is None:
        return []
    o = spec.optim
    keys = [f"--{key}" for key, on in (("zero_terminal_snr", o.zero_terminal_snr),
                                       ("debiased_estimation_loss", o.debiased_estimation_loss),
                                       ("loss_type", o.loss_type != "l2")) if on]
    problems = [f"{key} works on the DDPM noise schedule and the EDM-style loss has none; drop it or train without "
                "--do_edm_style_training (on a non-EDM pipeline)" for key in keys]
    if o.masked_loss:
        problems.append("--masked_loss is not implemented for the EDM-style loss; drop it or train without "
                        "--do_edm_style_training")
    return problems


def refuse_sdxl_options(spec: spec_lib.RunSpec, model_dir: Path) -> None:
    """The options an SDXL run does not take (``sdxl.option_problems``, shared with the JAX backend), each
    named with its fix, before any model loads."""
    problems = sdxl.option_problems(spec)
    if problems:
        raise JaxboothError(f"{model_dir / 'model_index.json'} is an SDXL pipeline:\n" + "\n".join(problems))


def resolve_inputs(spec: spec_lib.RunSpec) -> RunInputs:
    """Local model folders (Hub ids resolved through the cache), output folder and seed."""
    from jaxbooth.hub import resolve_model_dir, resolve_vae_dir

    m = spec.model
    if m.pretrained_model_name_or_path is None:
        raise JaxboothError("pretrained_model_name_or_path must be set (the CLI fills in the built-in tiny model; "
                            "call jaxbooth.run_defaults.fill_defaults)")
    hub = {"revision": m.revision, "token": spec.hub.hub_token, "cache_dir": spec.data.cache_dir}
    # the pipeline class first, from model_index.json alone: an SDXL or IF repo downloads no weights
    check_supported(spec, Path(resolve_model_dir(m.pretrained_model_name_or_path, subfolders=[], **hub)))
    model_dir = resolve_model_dir(m.pretrained_model_name_or_path, variant=m.variant, **hub)
    vae_name = spec_lib.vae_name_or_path(spec)
    vae_dir = resolve_vae_dir(vae_name, variant=m.variant, **hub) if vae_name else None
    seed = spec.optim.seed if spec.optim.seed is not None else 0
    return RunInputs(spec, Path(model_dir), vae_dir, Path(spec.checkpointing.output_dir).absolute(), seed)


def reset_accelerate_state() -> None:
    """Forget a previous in-process run's accelerate singletons (tests, notebooks).

    Skipped once torch.distributed is up: then this process was launched for one run.
    """
    from accelerate.state import AcceleratorState, GradientState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cpu_only_multiprocess() -> bool:
    """A multi-process launch (``accelerate launch --multi_gpu``, torchrun) on a machine without GPUs.

    accelerate then runs data parallel over gloo only when told ``cpu=True``; a DeepSpeed launch
    is left alone (DeepSpeed brings its own CPU accelerator, and ``cpu=True`` would turn it off).
    """
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return multi and not deepspeed and not torch.cuda.is_available()


def make_accelerator(run: RunInputs) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    spec = run.spec
    reset_accelerate_state()
    report_to = spec.logging.report_to
    project = ProjectConfiguration(project_dir=str(run.output_dir),
                                   logging_dir=str(run.output_dir / spec.logging.logging_dir))
    try:
        accelerator = Accelerator(cpu=cpu_only_multiprocess(),
                                  gradient_accumulation_steps=spec.optim.gradient_accumulation_steps,
                                  mixed_precision=spec.precision.mixed_precision,
                                  log_with=None if report_to == "none" else report_to, project_config=project,
                                  kwargs_handlers=ddp_handlers(run))
    except (ValueError, ImportError, RuntimeError) as error:
        raise JaxboothError(f"accelerate could not start: {error}. Check --mixed_precision="
                            f"{spec.precision.mixed_precision}, --gradient_accumulation_steps="
                            f"{spec.optim.gradient_accumulation_steps} and --report_to={report_to} against your "
                            "accelerate config, and install the tracker you report to") from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise JaxboothError("--mixed_precision=fp16 needs a GPU (torch has no fp16 autocast on CPU, so the "
                            "UNet would see mixed dtypes); on CPU use --mixed_precision=bf16 or no")
    return accelerator


def ddp_handlers(run: RunInputs) -> list[Any]:
    """accelerate kwargs handlers: DDP's unused-parameter search when SDXL's text encoders train, since SDXL
    reads the first encoder's penultimate layer and its last layer gets no gradient (``models.SdxlTextEncoders``)."""
    if not (run.spec.model.train_text_encoder and sdxl.is_sdxl_pipeline(run.model_dir)):
        return []
    from accelerate import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def prepare_class_images(run: RunInputs, accelerator: Any) -> None:
    """Generate missing class images (prior preservation), split over processes, before the dataset scan."""
    spec = run.spec
    if not spec.prior.with_prior_preservation or spec.prior.class_data_dir is None:
        return  # no class folder: a --dataset_config's is_reg subsets are read as they are
    plan = class_images.plan_for_spec(spec, process_index=accelerator.process_index,
                                      num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process plans before any writes
    class_images.generate_class_images(spec, run.model_dir, device=accelerator.device, seed=run.seed,
                                       process_index=accelerator.process_index,
                                       num_processes=accelerator.num_processes, plan=plan)
    accelerator.wait_for_everyone()


def make_dataset(spec: spec_lib.RunSpec, instances: data.Dataset | None = None) -> data.Dataset:
    """The shared dataset (instance folder or --dataset_name, repeats, class images) both backends train on;
    ``instances``: the instance images ``start_run`` already read."""
    return data.dataset_from_spec(spec, instances=instances)


def make_iterator(spec: spec_lib.RunSpec, dataset: data.Dataset, accelerator: Any, seed: int) -> data.BatchIterator:
    """Global batch = train_batch_size x processes; this process takes its slice (instance rows, then class rows)."""
    return data.BatchIterator(dataset, resolution=spec.data.resolution,
                              batch_size=spec.optim.train_batch_size * accelerator.num_processes, seed=seed,
                              center_crop=spec.data.center_crop, random_flip=spec.data.random_flip,
                              process_index=accelerator.process_index, process_count=accelerator.num_processes,
                              num_workers=spec.data.dataloader_num_workers,
                              interpolation=spec.data.image_interpolation_mode,
                              buckets=data.buckets.plan_for_dataset(dataset,
                                                                    data.buckets.BucketSettings.from_spec(spec)))


def loss_options(spec: spec_lib.RunSpec, m: models.Models) -> LossOptions:
    scale, shift = models.latent_factors(m.vae)
    shift = sdxl.latent_shift(shift, m.is_sdxl)
    return LossOptions(prediction_type=m.schedule.prediction_type, snr_gamma=spec.optim.snr_gamma,
                       offset_noise=spec.optim.offset_noise,
                       with_prior_preservation=spec.prior.with_prior_preservation,
                       prior_loss_weight=spec.prior.prior_loss_weight, latent_scaling_factor=scale,
                       latent_shift_factor=shift, **loss_lib.spec_loss_options(spec.optim))


def setup_optimization(run: RunInputs, accelerator: Any, m: models.Models, max_train_steps: int):
    """Optimizer and LR schedule, then ``accelerator.prepare``; returns (unet, text encoder or None, opt, sched).
    The text encoder is the trained one (``models.trained_text_encoder``: SDXL's two as one module)."""
    spec = run.spec
    plugin = memory.deepspeed_plugin(accelerator)
    memory.check_deepspeed(spec, plugin)
    if plugin is not None:
        memory.configure_deepspeed(plugin, train_batch_size=spec.optim.train_batch_size,
                                   max_grad_norm=spec.optim.max_grad_norm)
    train_te = spec.model.train_text_encoder
    text_encoder = models.trained_text_encoder(m) if train_te else None
    groups = optim.param_groups(spec, m.unet, text_encoder, accelerator.num_processes)
    optimizer, name = optim.make_optimizer(
        spec, groups, deepspeed_cpu_offload=plugin is not None and memory.offloads_optimizer(plugin),
        under_deepspeed=plugin is not None)
    lr_scheduler = optim.make_lr_scheduler(spec, optimizer, max_train_steps, accelerator.num_processes)
    log(accelerator, f"optimizer: {name}" + (" under DeepSpeed ZeRO-" + str(plugin.zero_stage) if plugin else ""))
    if train_te:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(m.unet, text_encoder, optimizer,
                                                                          lr_scheduler)
        return unet, text_encoder, optimizer, lr_scheduler
    unet, optimizer, lr_scheduler = accelerator.prepare(m.unet, optimizer, lr_scheduler)
    return unet, None, optimizer, lr_scheduler


def make_text_conditioner(run: RunInputs, m: models.Models, tokenize: Any, dataset: data.Dataset,
                          device: torch.device, disk: Any = None) -> TextConditioner | SdxlTextConditioner:
    """Frozen encoder(s): embeddings cached per prompt; with pre_compute_text_embeddings all are
    computed now (validation prompt and the empty negative prompt too) and the encoders freed.
    SDXL: both encoders, each with its own tokenizer. A trained encoder is set on it afterwards
    (``conditioner.text_encoder``): then every batch is encoded live. ``disk``: the
    ``--cache_text_embeddings_to_disk`` store (``inputs.disk_stores``)."""
    spec = run.spec
    conditioner: TextConditioner | SdxlTextConditioner
    is_sdxl = sdxl.is_sdxl_pipeline(run.model_dir)
    if is_sdxl:
        conditioner = SdxlTextConditioner(m.text_encoders, (tokenize, make_tokenize_fn(m.tokenizer_2)), device,
                                          resolution=spec.data.resolution, disk=disk)
    else:
        conditioner = TextConditioner(m.text_encoder, tokenize, device, trained=spec.model.train_text_encoder,
                                      use_attention_mask=spec.model.text_encoder_use_attention_mask, disk=disk)
    if spec.precision.pre_compute_text_embeddings:
        drawn = dataset.possible_captions()  # every tag order and the dropped caption, when they vary
        if drawn is None:
            raise JaxboothError("--pre_compute_text_embeddings frees the text encoder, but --shuffle_caption gives "
                                "more tag orders than can be encoded up front (over 4096); drop "
                                "--pre_compute_text_embeddings (the encoder then encodes each batch)")
        prompts = set(drawn) | {""}
        if spec.validation.validation_prompt is not None:
            prompts.add(spec.validation.validation_prompt)
        prompts |= sample_prompts.prompt_texts(sample_prompts.spec_sample_prompts(spec))
        conditioner.precompute(prompts)
        conditioner.free_encoder()
        m.text_encoder = None
        if is_sdxl:
            m.text_encoder_2 = None
    return conditioner


def init_trackers(run: RunInputs, accelerator: Any) -> None:
    if accelerator.is_main_process and run.spec.logging.report_to != "none":
        config = {k: v for k, v in run.spec.flat().items()
                  if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers("dreambooth", config=config)


def check_local_rank(local_rank: int, launched_as: int) -> None:
    """``--local_rank`` is what torch launchers pass; the launcher's LOCAL_RANK wins, as in diffusers.

    Given by hand and contradicting the process accelerate started, it is an error rather than a
    flag that quietly does nothing.
    """
    if local_rank == -1 or "LOCAL_RANK" in os.environ:
        return
    if local_rank != launched_as:
        raise JaxboothError(f"--local_rank={local_rank}, but this process is local rank {launched_as}; the launcher "
                            "sets it (accelerate launch / torchrun), so drop --local_rank")


def start_run(spec: spec_lib.RunSpec) -> tuple[RunInputs, Any]:
    """Inputs, accelerator and seed; clears interrupted checkpoints; fills class_data_dir."""
    from accelerate.utils import set_seed

    run = resolve_inputs(spec)
    run.instances = data.instance_dataset(spec)  # a missing or broken image source fails before any model loads
    accelerator = make_accelerator(run)
    memory.check_xformers(spec.precision.enable_xformers_memory_efficient_attention, accelerator.device)
    check_local_rank(spec.parallelism.local_rank, accelerator.local_process_index)
    set_seed(run.seed)  # global RNGs (dropout, if a model has any); the loss draws its own per step
    if accelerator.is_main_process:
        for warning in deepfloyd.option_warnings(spec, pipelines.pipeline_class(run.model_dir)):
            jaxbooth_log.warning(warning)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        clear_incomplete(run.output_dir)
    prepare_class_images(run, accelerator)
    return run, accelerator


def build_trainer(run: RunInputs, accelerator: Any, written: list[str]) -> tuple[Trainer, int]:
    """Data, models, memory options, optimizer, resume: the Trainer and the step to start from."""
    spec, device = run.spec, accelerator.device
    dataset = make_dataset(spec, run.instances)
    max_train_steps = spec_lib.total_train_steps(spec, len(dataset), accelerator.num_processes)
    hub = {"revision": spec.model.revision, "cache_dir": spec.data.cache_dir, "token": spec.hub.hub_token}
    tokenizer = load_tokenizer(run.model_dir, tokenizer_name=spec.model.tokenizer_name, **hub)
    tokenizer_2 = load_tokenizer(run.model_dir, subfolder="tokenizer_2", **hub) if sdxl.is_sdxl_pipeline(
        run.model_dir) else None
    m = models.load_models(run.model_dir, vae_dir=run.vae_dir, variant=spec.model.variant, tokenizer=tokenizer,
                           tokenizer_2=tokenizer_2)
    m.schedule = loss_lib.training_schedule(m.schedule, spec.optim.zero_terminal_snr)
    dtype = models.weight_dtype(accelerator.mixed_precision)
    latent_disk, text_disk = disk_stores(spec, model_dir=run.model_dir, vae_dir=m.vae_dir,
                                         vae_dtype=models.vae_dtype(m, dtype), text_dtype=dtype, is_sdxl=m.is_sdxl)
    tokenize = make_tokenize_fn(tokenizer, spec.model.tokenizer_max_length)
    if m.if_stage is not None:  # train on the prompt text the IF pipelines encode at inference
        tokenize = deepfloyd.sampled_prompts(tokenize)
    conditioner = None
    if spec.precision.pre_compute_text_embeddings:  # encode and free the encoders before the UNet is prepared
        models.prepare_frozen_text_encoders(m, device=device, dtype=dtype)
        conditioner = make_text_conditioner(run, m, tokenize, dataset, device, text_disk)
    in_effect = memory.apply_memory_options(spec, m.unet, m.text_encoder, device, text_encoder_2=m.text_encoder_2)
    adapters = AdapterSettings.from_spec(spec, sdxl=m.is_sdxl) if spec.lora.use_lora else None
    if adapters is not None:  # only the adapters train; the frozen base is kept in the weight dtype
        lora.attach(m.unet, m.text_encoder, adapters, seed=run.seed, dtype=dtype, text_encoder_2=m.text_encoder_2)
    unet, text_encoder, optimizer, lr_scheduler = setup_optimization(run, accelerator, m, max_train_steps)
    models.prepare_frozen(m, train_text_encoder=spec.model.train_text_encoder, device=device, dtype=dtype)
    if conditioner is None:
        conditioner = make_text_conditioner(run, m, tokenize, dataset, device, text_disk)
    if text_encoder is not None:
        conditioner.text_encoder = text_encoder
    iterator = make_iterator(spec, dataset, accelerator, run.seed)
    checkpoint.register_state_hooks(accelerator, adapters)
    averages = make_ema(spec, accelerator, unet, text_encoder)
    record, resumed_from = checkpoint.maybe_resume(accelerator, spec, run.output_dir)
    start_step = 0
    if record is not None:
        iterator.load_state_dict(record["data"])
        start_step = int(record["step"])
        log(accelerator, f"resumed from {resumed_from} at optimizer step {start_step}")
    trainer = Trainer(
        spec=spec, accelerator=accelerator, unet=unet, text_encoder=text_encoder, optimizer=optimizer,
        lr_scheduler=lr_scheduler, iterator=iterator,
        latents=PixelSource(device) if m.vae is None else LatentCache(
            m.vae, device, models.vae_dtype(m, dtype), enabled=spec.precision.cache_latents,
            statistics=m.latent_statistics, disk=latent_disk, interpolation=spec.data.image_interpolation_mode),
        text=conditioner,
        tables=m.schedule.as_tables().map(lambda table: torch.from_numpy(table).to(device)),
        options=loss_options(spec, m), seed=run.seed, max_train_steps=max_train_steps, output_dir=run.output_dir,
        validate=make_validator(run, accelerator, m, unet, text_encoder, conditioner, written),
        edm=edm_schedule(run.model_dir, spec.sdxl.do_edm_style_training, device),
        upscaler=UpscalerConditioning.from_model_dir(run.model_dir, spec.data.resolution, device)
        if m.if_stage == 2 else None, ema=averages,
        sample=make_sample_hook(run, accelerator, m, unet, text_encoder, conditioner))
    if adapters is not None:
        log(accelerator, f"LoRA: rank {adapters.rank}, alpha {adapters.alpha:g}, dropout {adapters.dropout:g}"
                         f"{', DoRA' if adapters.use_dora else ''}; trained parameters: "
                         f"{sum(p.numel() for p in trainer.trained_parameters):,}")
    log(accelerator, f"training {max_train_steps} optimizer steps on {accelerator.num_processes} process(es), "
                     f"device {device}, mixed precision {accelerator.mixed_precision}, attention "
                     f"{in_effect['attention']}, gradient checkpointing {in_effect['gradient_checkpointing']}")
    return trainer, start_step


def make_ema(spec: spec_lib.RunSpec, accelerator: Any, unet: Any, text_encoder: Any | None) -> optim.EmaWeights | None:
    """``--use_ema``: the average of what trains (the prepared models' parameters that need a gradient: full
    weights, or a LoRA run's adapters), registered with accelerate so checkpoints save and resume it."""
    if not spec.optim.use_ema:
        return None
    plugin = memory.deepspeed_plugin(accelerator)
    if plugin is not None and plugin.zero_stage == 3:
        raise JaxboothError("--use_ema under DeepSpeed ZeRO-3: each process holds only a shard of every weight, so "
                            "there is no whole weight to average; use ZeRO-2 (scripts/accelerate_deepspeed_zero2_"
                            "offload.yaml) or drop --use_ema")
    trained = [unet] + ([text_encoder] if text_encoder is not None else [])
    averages = optim.EmaWeights([p for model in trained for p in model.parameters() if p.requires_grad],
                                spec.optim.ema_decay)
    checkpoint.register_ema(accelerator, averages)
    log(accelerator, ema.EMA_LOG.format(decay=spec.optim.ema_decay))
    return averages


def train(spec: spec_lib.RunSpec) -> Path:
    """Run DreamBooth end to end on the torch backend; returns the output pipeline folder."""
    run, accelerator = start_run(spec)
    written: list[str] = []  # validation grids, for the model card
    trainer, start_step = build_trainer(run, accelerator, written)
    init_trackers(run, accelerator)
    try:
        steps_done = run_loop(trainer, start_step)
    finally:
        trainer.iterator.close()
    for source in (trainer.latents, trainer.text):  # --cache_*_to_disk: "encoded N, read M from the disk cache"
        if getattr(source, "disk", None) is not None:
            log(accelerator, source.disk.summary())
    accelerator.wait_for_everyone()
    if trainer.ema is not None:  # the output holds the averages, not the raw weights
        trainer.ema.copy_to_parameters()
        log(accelerator, f"writing the EMA weights (after {trainer.ema.optimizer_steps} optimizer steps) as the output")
    if accelerator.is_main_process:
        save = save_lora if spec.lora.use_lora else save_pipeline
        out = save(run, accelerator, trainer.unet, trainer.text_encoder, steps_done, written)
        if spec.hub.push_to_hub:
            repo = output.push_to_hub(out, repo_id=spec.hub.hub_model_id, token=spec.hub.hub_token)
            log(accelerator, f"pushed to the Hub: {repo}")
        log(accelerator, f"done: {steps_done} optimizer steps; {'LoRA' if spec.lora.use_lora else 'pipeline'} "
                         f"written to {out}")
    accelerator.end_training()
    return run.output_dir
