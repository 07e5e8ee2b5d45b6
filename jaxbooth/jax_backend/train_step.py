"""The pure DreamBooth train step: state in, state and metrics out.

Static pieces (model apply functions, the optax transform, noise tables, the loss
options) are bound with ``functools.partial`` by :func:`make_train_step`; the jitted
step then sees only arrays. The noise/target/loss math is the shared numpy-defined
code in ``jaxbooth.diffusion``, so both backends compute the same loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import optax

from jaxbooth import diffusion, loss_options, sdxl
from jaxbooth.jax_backend import optim
from jaxbooth.loss_options import LossOptions

__all__ = ["SDXL_INPUT_IDS", "LossOptions", "TrainState", "added_conditions", "denoising_loss", "draw_noise_from",
           "gradient_step", "make_train_step", "step_halves", "text_conditioning", "train_step", "update_step"]

# SDXL with trained text encoders: the frozen keys of each tokenizer's ids per prompt, in
# ``sdxl.TEXT_ENCODERS`` order (``caches.build_caches`` fills them).
SDXL_INPUT_IDS = ("input_ids", "input_ids_2")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; donated into each step.

    ``params`` holds only what is trained: ``{"unet": ...}`` plus ``"text_encoder"`` (SDXL: and
    ``"text_encoder_2"``) when ``train_text_encoder`` is set, so a frozen encoder has no gradient and
    no optimizer state.
    With LoRA these are the adapters (``jax_backend.lora``) and the base params travel in
    ``frozen["base"]``; the step's ``merge`` turns the two into the params the models apply.
    ``step`` counts micro-batches (optimizer updates happen every accumulation window).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def sample_latents(frozen: dict, example_idx: jax.Array, key: jax.Array, options: LossOptions) -> jax.Array:
    """Draw latents from the cached VAE posterior, as diffusers' ``latent_dist.sample()`` does each step."""
    mean = frozen["latent_mean"][example_idx]
    std = frozen["latent_std"][example_idx]
    latents = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
    return (latents - options.latent_shift_factor) * options.latent_scaling_factor


def encode_prompts(params: Any, frozen: dict, prompt_idx: jax.Array, text_apply: Callable | None,
                   options: LossOptions) -> jax.Array:
    """Text conditioning: cached embeddings for a frozen encoder, a forward pass for a trained one."""
    if not options.train_text_encoder:
        return frozen["text_embeddings"][prompt_idx]
    input_ids = frozen["input_ids"][prompt_idx]
    mask = frozen["attention_mask"][prompt_idx] if options.text_encoder_use_attention_mask else None
    return text_apply({"params": params["text_encoder"]}, input_ids, mask)


def added_conditions(frozen: dict, batch: dict, text_embeds: jax.Array | None = None) -> dict | None:
    """SDXL's ``added_cond_kwargs`` of the batch: each row's pooled embedding (``text_embeds`` when the step
    computed it, else the prompt's cached one) and its latent row's time ids (None for SD, whose cache has
    neither)."""
    if "time_ids" not in frozen:
        return None
    if text_embeds is None:
        text_embeds = frozen["pooled_embeddings"][batch["prompt_idx"]]
    return {"text_embeds": text_embeds, "time_ids": frozen["time_ids"][batch["example_idx"]]}


def row_text_conditioning(params: Any, frozen: dict, batch: dict, text_apply: Callable,
                          options: LossOptions) -> tuple[jax.Array, dict | None]:
    """:func:`text_conditioning` of token ids the batch carries per row (``caches.row_tokenizer``): through the
    trained encoders in ``params``, or the frozen ones in ``frozen["text_encoders"]`` (no gradient reaches them);
    SDXL's pooled embeds come from the same pass, the time ids stay the latent rows' cached ones."""
    encoders = params if options.train_text_encoder else frozen["text_encoders"]
    if SDXL_INPUT_IDS[-1] in batch:
        hidden, pooled = text_apply(tuple(encoders[name] for name in sdxl.TEXT_ENCODERS),
                                    tuple(batch[key] for key in SDXL_INPUT_IDS))
        return hidden, added_conditions(frozen, batch, pooled)
    mask = batch["attention_mask"] if options.text_encoder_use_attention_mask else None
    return text_apply({"params": encoders["text_encoder"]}, batch["input_ids"], mask), added_conditions(frozen, batch)


def text_conditioning(params: Any, frozen: dict, batch: dict, text_apply: Callable | None,
                      options: LossOptions) -> tuple[jax.Array, dict | None]:
    """(encoder hidden states, SDXL ``added_cond_kwargs`` or None) of the batch.

    SDXL with trained encoders (``frozen`` holds :data:`SDXL_INPUT_IDS`): ``text_apply(params, ids)``,
    both tuples in ``sdxl.TEXT_ENCODERS`` order, is ``encode.sdxl_conditioning`` of the two encoders and
    gives the prompt embeds and the pooled embeds; the time ids stay the latent rows' cached ones.
    """
    if "input_ids" in batch:  # the rows' own token ids (shuffled captions past caches.MAX_CACHED_CAPTIONS)
        return row_text_conditioning(params, frozen, batch, text_apply, options)
    if options.train_text_encoder and SDXL_INPUT_IDS[-1] in frozen:
        ids = tuple(frozen[key][batch["prompt_idx"]] for key in SDXL_INPUT_IDS)
        hidden, pooled = text_apply(tuple(params[name] for name in sdxl.TEXT_ENCODERS), ids)
        return hidden, added_conditions(frozen, batch, pooled)
    return encode_prompts(params, frozen, batch["prompt_idx"], text_apply, options), added_conditions(frozen, batch)


def denoising_loss(unet_params: Any, latents: jax.Array, noise: jax.Array, timesteps: jax.Array,
                   encoder_hidden_states: jax.Array, *, unet_apply: Callable, tables: diffusion.NoiseTables,
                   options: LossOptions, added_cond_kwargs: dict | None = None, mask: jax.Array | None = None):
    """The DreamBooth loss for given latents, noise and timesteps (no randomness inside).

    Shared by the train step and the cross-backend parity test; returns (loss, aux metrics).
    ``added_cond_kwargs`` (SDXL: ``text_embeds``, ``time_ids``) reaches the UNet only when given;
    ``mask`` ``[B, h, w, 1]`` (``--masked_loss``) weights the per-element loss.
    """
    noisy = diffusion.add_noise(latents, noise, timesteps, tables)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    pred = unet_apply({"params": unet_params}, noisy, timesteps, encoder_hidden_states, **extra)
    return loss_options.loss_from_prediction(pred, latents, noise, timesteps, tables, options, mask)


def _resize(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Bilinear resize with half-pixel centres: torch's ``interpolate(mode="bilinear")`` when upsampling."""
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


def draw_noise_from(noise_key: jax.Array, offset_key: jax.Array, latents: jax.Array,
                    options: LossOptions) -> jax.Array:
    """The training noise (NHWC): a standard normal, plus offset noise and kohya's multires noise when asked,
    in that order (kohya's), from the shared formulas in ``jaxbooth.diffusion`` / ``jaxbooth.loss_options``.
    The multires draws come from ``fold_in(noise_key, 1)``, so the other draws stay what they were."""
    noise = jax.random.normal(noise_key, latents.shape, latents.dtype)
    if options.offset_noise:
        offsets = jax.random.normal(offset_key, diffusion.offset_noise_shape(latents.shape), latents.dtype)
        noise = diffusion.offset_noise(noise, offsets)
    if options.multires_noise_iterations:
        shapes = loss_options.multires_noise_shapes(latents.shape, options.multires_noise_iterations)
        keys = jax.random.split(jax.random.fold_in(noise_key, 1), len(shapes))
        draws = [jax.random.normal(k, shape, latents.dtype) for k, shape in zip(keys, shapes, strict=True)]
        noise = loss_options.multires_noise(noise, draws, _resize, options.multires_noise_discount)
    return noise


def compute_loss(params: Any, frozen: dict, batch: dict, key: jax.Array, *, unet_apply: Callable,
                 text_apply: Callable | None, tables: diffusion.NoiseTables, options: LossOptions,
                 merge: Callable | None = None):
    """Draw latents, noise (plus offset noise) and timesteps from ``key``, then :func:`denoising_loss`.

    ``merge(params, frozen) -> model params`` (LoRA: the adapters merged into ``frozen["base"]``)
    runs inside the differentiated function, so the gradient reaches ``params`` through it.
    """
    if merge is not None:
        params = merge(params, frozen)
    latent_key, noise_key, offset_key, time_key = jax.random.split(key, 4)
    latents = sample_latents(frozen, batch["example_idx"], latent_key, options)
    noise = draw_noise_from(noise_key, offset_key, latents, options)
    num_train_timesteps = tables.snr.shape[0]
    timesteps = jax.random.randint(time_key, (latents.shape[0],), 0, num_train_timesteps)
    encoder_hidden_states, added_cond_kwargs = text_conditioning(params, frozen, batch, text_apply, options)
    mask = frozen["loss_mask"][batch["example_idx"]] if "loss_mask" in frozen else None  # --masked_loss
    return denoising_loss(params["unet"], latents, noise, timesteps, encoder_hidden_states, unet_apply=unet_apply,
                          tables=tables, options=options, added_cond_kwargs=added_cond_kwargs, mask=mask)


def gradient_step(state: TrainState, frozen: dict, batch: dict, *, unet_apply: Callable,
                  text_apply: Callable | None, tables: diffusion.NoiseTables,
                  options: LossOptions, merge: Callable | None = None) -> tuple[Any, dict]:
    """The gradients of one micro-step's loss, and the losses (the first half of :func:`train_step`)."""
    key = jax.random.fold_in(state.rng, state.step)
    loss_fn = functools.partial(compute_loss, frozen=frozen, batch=batch, key=key, unet_apply=unet_apply,
                                text_apply=text_apply, tables=tables, options=options, merge=merge)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, {"loss": loss, **aux}


def update_step(state: TrainState, grads: Any, losses: dict, *, tx: optax.GradientTransformation,
                lr_schedule: Callable, gradient_accumulation_steps: int = 1) -> tuple[TrainState, dict]:
    """The optax update (accumulation lives inside ``tx``) and the metrics (the second half).

    ``grad_norm`` is the norm of the gradient the clip saw: after the last micro-step of an
    accumulation window, of the window's averaged gradient (what torch's ``clip_grad_norm_``
    returns and logs); ``tx`` must come from ``optim.make_optimizer``, which records it.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**losses, "grad_norm": optim.accumulated_grad_norm(opt_state),
               "lr": lr_schedule(state.step // gradient_accumulation_steps)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def train_step(state: TrainState, frozen: dict, batch: dict, *, unet_apply: Callable,
               text_apply: Callable | None, tx: optax.GradientTransformation,
               lr_schedule: Callable, tables: diffusion.NoiseTables, options: LossOptions,
               gradient_accumulation_steps: int = 1, merge: Callable | None = None) -> tuple[TrainState, dict]:
    """One micro-step: gradients, optax update, metrics."""
    grads, losses = gradient_step(state, frozen, batch, unet_apply=unet_apply, text_apply=text_apply,
                                  tables=tables, options=options, merge=merge)
    return update_step(state, grads, losses, tx=tx, lr_schedule=lr_schedule,
                       gradient_accumulation_steps=gradient_accumulation_steps)


def make_train_step(**static) -> Callable:
    """Bind the static pieces; the result is ``step(state, frozen, batch) -> (state, metrics)``."""
    return functools.partial(train_step, **static)


def step_halves(step_fn: functools.partial) -> tuple[Callable, Callable]:
    """``make_train_step``'s step as its two halves, with the same static pieces bound:
    ``grads(state, frozen, batch) -> (grads, losses)`` and ``update(state, grads, losses)``."""
    static = step_fn.keywords
    grads = functools.partial(gradient_step, **{k: static[k] for k in ("unet_apply", "text_apply", "tables",
                                                                      "options")}, merge=static.get("merge"))
    update = functools.partial(update_step, tx=static["tx"], lr_schedule=static["lr_schedule"],
                               gradient_accumulation_steps=static.get("gradient_accumulation_steps", 1))
    return grads, update
