"""Probes of the torch backend for tests/test_spec_coverage.py: ``probe(spec, env) -> comparable``.

Each probe runs ``torch_backend.train``'s own phases (resolve_inputs, make_accelerator,
make_dataset, make_iterator, setup_optimization, make_text_conditioner, build_trainer,
make_validator, run_loop, ...) on the spec with a real accelerate ``Accelerator`` on the CPU;
only the expensive leaves are replaced (the UNet in the loop, the class-image pipeline, the
validation pipeline, the Hub), and the probe returns what the run would do differently.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np

from jaxbooth import spec as spec_lib
from tests._coverage_env import Env, dataset_summary, fingerprint, recorder, stop_at
from tests._coverage_probes import captured_stderr, decoding_threads, fake_hub, hub_calls, tokenizer_calls


def _train() -> Any:
    import pytest

    pytest.importorskip("diffusers")  # the torch extra
    from jaxbooth.torch_backend import train

    return train


def _run_and_accelerator(spec: spec_lib.RunSpec) -> tuple[Any, Any]:
    train = _train()
    run = train.resolve_inputs(spec)
    return run, train.make_accelerator(run)


torch_hub = hub_calls(lambda spec: _train().resolve_inputs(spec), "torch_hub")


def _torch_load_phase(spec: spec_lib.RunSpec, env: Env) -> None:
    """build_trainer up to the model load (the tokenizer is loaded just before it)."""
    from jaxbooth.torch_backend import models

    run, accelerator = _run_and_accelerator(spec)
    with stop_at(models, "load_models", call_through=False):
        _train().build_trainer(run, accelerator, [])


torch_tokenizer_hub = tokenizer_calls(_torch_load_phase, "torch_tokenizer_hub")


def torch_inputs(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """resolve_inputs: model and VAE folders, output folder, seed."""
    run = _train().resolve_inputs(spec)
    return str(run.model_dir), str(run.vae_dir), str(run.output_dir), run.seed


def torch_start(spec: spec_lib.RunSpec, env: Env) -> Any:
    """start_run (inputs, accelerator, launcher and kernel checks, class images): the seed, or its refusal."""
    from jaxbooth.errors import JaxboothError

    spec = spec_lib.replace_flat(spec, output_dir=str(env.fresh("start")))
    try:
        run, _ = _train().start_run(spec)
    except JaxboothError as error:
        return f"error: {str(error).splitlines()[0][:80]}"
    return "started", run.seed


def torch_accelerator(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """make_accelerator: mixed precision, accumulation, trackers and their logging folder."""
    _, accelerator = _run_and_accelerator(spec)
    return (accelerator.mixed_precision, accelerator.gradient_accumulation_steps,
            tuple(str(t) for t in accelerator.log_with), str(accelerator.logging_dir))


def torch_dataset(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """make_dataset: files, captions, roles and epoch length."""
    return dataset_summary(_train().make_dataset(spec))


def torch_dataset_or_error(spec: spec_lib.RunSpec, env: Env) -> Any:
    from jaxbooth.errors import JaxboothError

    try:
        return torch_dataset(spec, env)
    except JaxboothError as error:
        return f"error: {str(error).splitlines()[0][:60]}"


def torch_batches(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """make_iterator's first batch: its pixels (resolution, crop, flip, resize filter), the
    threads that decoded it, and the iterator's batch size."""
    from jaxbooth.data import batches

    train = _train()
    run, accelerator = _run_and_accelerator(spec)
    iterator = train.make_iterator(spec, train.make_dataset(spec), accelerator, run.seed)
    try:
        with decoding_threads(batches, ("load_image_with_info",)) as threads:
            batch = next(iterator)
    finally:
        iterator.close()
    return (fingerprint(batch["pixel_values"]), tuple(batch["flipped"].tolist()),
            tuple(map(tuple, batch["crop_top_left"].tolist())), tuple(sorted(threads)), iterator.batch_size)


class _FakePipeline:
    """The class-image pipeline's call, recording the prompt batch of every call."""

    def __init__(self, batches: list[int]):
        self.batches = batches

    def __call__(self, prompts: list[str], generator: Any = None) -> Any:
        from PIL import Image

        self.batches.append(len(prompts))
        return SimpleNamespace(images=[Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(len(prompts))])


def torch_class_images(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """prepare_class_images into an empty class folder: the pipeline's dtype/variant and batch sizes."""
    from jaxbooth.torch_backend import class_images

    spec = spec_lib.replace_flat(spec, class_data_dir=str(env.fresh("class")))
    run, accelerator = _run_and_accelerator(spec)
    batches: list[int] = []
    loaded: list = []
    with mock.patch.object(class_images, "load_generation_pipeline",
                           recorder(loaded, lambda *a, **k: _FakePipeline(batches))):
        _train().prepare_class_images(run, accelerator)
    return tuple(batches), tuple((str(args[1]), args[3]) for args, _ in loaded)


def _tiny_modules() -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    unet, text_encoder = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        unet.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        text_encoder.weight.copy_(torch.tensor([[0.5, -0.5]]))
    return unet, text_encoder


class _FakeProdigy:
    """prodigyopt is not installed here: a stand-in ``prodigyopt`` module whose Prodigy is SGD that
    keeps the Prodigy hyper-parameters it is given in its param groups."""

    @staticmethod
    def module() -> Any:
        import torch

        class Prodigy(torch.optim.SGD):
            def __init__(self, params: Any, lr: float, weight_decay: float, **prodigy: Any):
                super().__init__(params, lr=lr, weight_decay=weight_decay)
                for group in self.param_groups:
                    group.update(prodigy)

        return SimpleNamespace(Prodigy=Prodigy)


def torch_optimizer(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """setup_optimization on two tiny models: optimizer class and group settings, the LR the
    scheduler gives over twelve steps, and the params after four updates with fixed gradients."""
    import sys

    import torch

    if spec.optim.use_8bit_adam:
        import pytest

        pytest.importorskip("bitsandbytes")
    train = _train()
    run, accelerator = _run_and_accelerator(spec)
    unet, text_encoder = _tiny_modules()
    models = SimpleNamespace(unet=unet, text_encoder=text_encoder)
    max_steps = spec_lib.total_train_steps(spec, len(train.make_dataset(spec)), accelerator.num_processes)
    installed = sys.modules.get("prodigyopt")  # not mock.patch.dict: that would unload what the call imports
    sys.modules["prodigyopt"] = installed or _FakeProdigy.module()
    try:
        unet, text_encoder, optimizer, scheduler = train.setup_optimization(run, accelerator, models, max_steps)
    finally:
        if installed is None:
            del sys.modules["prodigyopt"]
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = tuple(tuple(sorted((k, str(v)) for k, v in group.items() if k not in ("params", "lr", "initial_lr")))
                   for group in inner.param_groups)
    trained = [unet] + ([text_encoder] if text_encoder is not None else [])
    lrs = []
    for step in range(12):
        lrs.append(tuple(group["lr"] for group in inner.param_groups))
        if step < 4:
            for model in trained:
                for p in model.parameters():
                    scale = (5.0, 0.02, 3.0, 0.3)[step] * (1.0 if step != 1 else -1.0)
                    p.grad = scale * (1.0 + torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    params = tuple(tuple(p.detach().flatten().tolist()) for model in trained for p in model.parameters())
    return type(inner).__name__, groups, tuple(lrs), params


def torch_loss(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """One micro-step's loss (loop.micro_step_loss) with the backend's loss_options, a stand-in
    UNet (x -> 0.5 x) and fixed posteriors: Min-SNR, offset noise, prior rows and their weight."""
    import torch

    from jaxbooth.torch_backend import loop

    m = env.torch_models
    options = _train().loss_options(spec, m)
    rng = np.random.default_rng(0)
    mean = torch.as_tensor(rng.normal(size=(2, 4, 8, 8)), dtype=torch.float32)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0), seed=0, options=options, spec=spec,
        latents=SimpleNamespace(posterior=lambda batch: (mean, torch.full_like(mean, 0.1))),
        text=SimpleNamespace(embeddings=lambda prompts: torch.zeros(len(prompts), 77, 32)),
        tables=m.schedule.as_tables().map(torch.from_numpy), edm=None, upscaler=None,
        unet=lambda x, t, context, return_dict=False: (0.5 * x,))
    results = []
    for micro_step in range(4):  # four draws of timesteps and noise
        loss, aux = loop.micro_step_loss(trainer, {"caption": np.array(["a", "b"])}, micro_step)
        results.append((float(loss), float(aux["instance_loss"]), float(aux["prior_loss"])))
    return tuple(results)


def torch_memory(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """apply_memory_options on the tiny UNet and text encoder, as if on a CUDA machine for TF32:
    what is in effect, what it logs, the remat flags and the TF32 switches."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from jaxbooth.torch_backend import memory

    unet = UNet2DConditionModel.from_pretrained(env.tiny, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(env.tiny, subfolder="text_encoder")
    switches = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    before = [getattr(owner, name) for owner, name in switches]
    result: dict = {}
    try:
        for owner, name in switches:
            setattr(owner, name, False)
        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            log = captured_stderr(lambda: result.update(memory.apply_memory_options(
                spec, unet, text_encoder, torch.device("cpu"))))
        tf32 = tuple(getattr(owner, name) for owner, name in switches)
    finally:
        for (owner, name), value in zip(switches, before, strict=True):
            setattr(owner, name, value)
    return (tuple(sorted(result.items())), log.strip(), unet.is_gradient_checkpointing,
            text_encoder.is_gradient_checkpointing, tf32)


def torch_conditioner(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """make_text_conditioner with the real tiny text encoder: whether it is freed, and the embeddings."""
    import torch

    from jaxbooth.text import make_tokenize_fn

    train = _train()
    run = train.resolve_inputs(spec)
    m = SimpleNamespace(text_encoder=env.torch_models.text_encoder)
    tokenize = make_tokenize_fn(env.torch_models.tokenizer, spec.model.tokenizer_max_length)
    conditioner = train.make_text_conditioner(run, m, tokenize, train.make_dataset(spec), torch.device("cpu"))
    with torch.no_grad():
        embeddings = conditioner.embeddings([spec.data.instance_prompt])
    return conditioner.text_encoder is None, m.text_encoder is None, fingerprint(embeddings.numpy())


def torch_trainer(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """build_trainer up to the Trainer it builds: step count, tokenizer length, and how many VAE
    encodes two passes over one batch cost (cache_latents)."""
    run, accelerator = _run_and_accelerator(spec)
    with stop_at(_train(), "Trainer", call_through=False) as seen:
        _train().build_trainer(run, accelerator, [])
    kwargs = seen["kwargs"]
    latents, batch = kwargs["latents"], next(kwargs["iterator"])
    kwargs["iterator"].close()
    encodes: list = []
    with mock.patch.object(latents.vae, "encode", recorder(encodes, latents.vae.encode)):
        latents.posterior(batch)
        latents.posterior(batch)
    tokenize = kwargs["text"].tokenize
    return kwargs["max_train_steps"], tokenize.max_length, fingerprint(tokenize(["a photo of sks toy"])[0]), \
        len(encodes)


def torch_validator(spec: spec_lib.RunSpec, env: Env) -> Any:
    """make_validator, and one validation with the pipeline and sampling recorded: prompt, count, sampler."""
    import torch

    from jaxbooth.torch_backend import validation

    spec = spec_lib.replace_flat(spec, output_dir=str(env.fresh("validation")))
    run, accelerator = _run_and_accelerator(spec)
    unet, _ = _tiny_modules()
    m = SimpleNamespace(model_dir=run.model_dir, vae=None, text_encoder=object(), tokenizer=None)
    validate = _train().make_validator(run, accelerator, m, unet, None, None, [])
    if validate is None:
        return None
    pipelines: list = []
    sampled: list = []
    fake_pipeline = SimpleNamespace(unet=torch.nn.Linear(1, 1))
    with mock.patch.object(validation, "make_pipeline", recorder(pipelines, lambda **k: fake_pipeline)), \
            mock.patch.object(validation, "generate_images",
                              recorder(sampled, lambda *a, **k: [_blank()] * k["num_images"])):
        validate(1)
    scheduler = pipelines[0][1]["scheduler"]
    return type(scheduler).__name__, sampled[0][1]["prompt"], sampled[0][1]["num_images"]


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))


def torch_loop(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """run_loop over a tiny linear 'UNet' (loop.micro_step_loss replaced, accelerate, optimizer,
    scheduler, clipping and data real): micro-steps per step, logged, saved and validated steps,
    whether gradients are None after zero_grad, and the final weights."""
    import torch

    from jaxbooth import output
    from jaxbooth.torch_backend import checkpoint, loop

    train = _train()
    spec = spec_lib.replace_flat(spec, output_dir=str(env.fresh("loop")))
    run, accelerator = _run_and_accelerator(spec)
    dataset = train.make_dataset(spec)
    max_steps = spec_lib.total_train_steps(spec, len(dataset), accelerator.num_processes)
    unet, _ = _tiny_modules()
    unet, _, optimizer, scheduler = train.setup_optimization(run, accelerator, SimpleNamespace(
        unet=unet, text_encoder=None), max_steps)

    def micro_step_loss(t: Any, batch: Any, micro_step: int) -> tuple:
        x = torch.tensor([[1.0, 2.0, 3.0]]) * (1 + 4 * (micro_step % 3))
        loss = (t.unet(x) ** 2).sum()
        return loss, {"instance_loss": loss.detach(), "prior_loss": torch.zeros(())}

    saved: list = []
    validated: list = []
    trainer = loop.Trainer(spec=spec, accelerator=accelerator, unet=unet, text_encoder=None, optimizer=optimizer,
                           lr_scheduler=scheduler, iterator=train.make_iterator(spec, dataset, accelerator, run.seed),
                           latents=None, text=None, tables=None, options=None, seed=run.seed,
                           max_train_steps=max_steps, output_dir=run.output_dir, validate=recorder(validated))
    try:
        with mock.patch.object(loop, "micro_step_loss", micro_step_loss), \
                mock.patch.object(checkpoint, "save_checkpoint", recorder(saved)):
            done = loop.run_loop(trainer, 0)
    finally:
        trainer.iterator.close()
    logged = (run.output_dir / output.METRICS_FILENAME).read_text().splitlines()
    weight = accelerator.unwrap_model(unet).weight
    return (done, trainer.iterator.epoch, trainer.iterator.position, tuple(json.loads(x)["step"] for x in logged),
            tuple(args[2] for args, _ in saved), tuple(args[0] for args, _ in validated), weight.grad is None,
            tuple(weight.detach().flatten().tolist()))


def torch_saved_components(spec: spec_lib.RunSpec, env: Env) -> Any:
    """save_pipeline: which trained components it writes (stopped at output.components_to_save)."""
    from jaxbooth import output

    run, accelerator = _run_and_accelerator(spec)
    with stop_at(output, "components_to_save") as seen:
        _train().save_pipeline(run, accelerator, None, None, 1, [])
    return seen["result"]


def torch_finish(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """train()'s end: what it uploads to a fake Hub, with start, build, loop and pipeline writing stubbed."""

    train = _train()
    spec = spec_lib.replace_flat(spec, output_dir=str(env.root / "finish-torch"), report_to="none")
    run, accelerator = _run_and_accelerator(spec)
    trainer = SimpleNamespace(iterator=SimpleNamespace(close=lambda: None), unet=None, text_encoder=None,
                              latents=None, text=None, ema=None)
    with mock.patch.object(train, "start_run", lambda spec: (run, accelerator)), \
            mock.patch.object(train, "build_trainer", lambda *a: (trainer, 0)), \
            mock.patch.object(train, "run_loop", lambda *a: 2), \
            mock.patch.object(train, "save_pipeline", lambda run, *a: run.output_dir), fake_hub() as uploads:
        train.train(spec)
    return tuple(uploads)
