"""Probes of the JAX backend for tests/test_spec_coverage.py: ``probe(spec, env) -> comparable``.

Each probe runs the backend's own phase functions (``jax_backend.train``'s prepare_inputs,
make_optimizer, loss_options, make_validator, run_loop, ...) on the spec, with only the
expensive leaves replaced (the VAE encoder, the class-image sampler, the compiled train step,
jax.distributed, the Hub), and returns what the run would do differently: the data, the
optimizer's updates, the loss, the files and the calls that reach the outside world.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np

from jaxbooth import spec as spec_lib
from tests._coverage_env import Env, dataset_summary, fingerprint, recorder, stop_at

HUB_MODEL_ID = "owner/tiny-model"  # a Hub id, so the resolve phase asks the Hub (a recorder here)


def hub_calls(resolve_phase, name: str) -> Any:
    """Run ``resolve_phase()`` with ``jaxbooth.hub.resolve_model_dir`` recorded (answering the
    tiny pipeline); returns every call's (name, keyword arguments)."""
    from jaxbooth import hub

    def probe(spec: spec_lib.RunSpec, env: Env) -> tuple:
        calls: list = []
        with mock.patch.object(hub, "resolve_model_dir", recorder(calls, lambda *a, **k: env.tiny)):
            resolve_phase(spec)
        return tuple((str(args[0]), tuple(sorted((k, str(v)) for k, v in kwargs.items()))) for args, kwargs in calls)

    probe.__name__ = probe.__qualname__ = name
    return probe


def _jax_resolve_phase(spec: spec_lib.RunSpec) -> None:
    from jaxbooth.jax_backend import loading

    loading.resolve_model_paths(spec)


jax_hub = hub_calls(_jax_resolve_phase, "jax_hub")


def tokenizer_calls(load_phase, name: str) -> Any:
    """Run ``load_phase(spec, env)`` with ``CLIPTokenizer.from_pretrained`` recorded (answering the
    tiny tokenizer): what a ``--tokenizer_name`` Hub id is fetched with."""
    def probe(spec: spec_lib.RunSpec, env: Env) -> tuple:
        from transformers import CLIPTokenizer

        real = CLIPTokenizer.from_pretrained
        calls: list = []

        def from_pretrained(target: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((str(target), tuple(sorted((k, str(v)) for k, v in kwargs.items()))))
            return real(str(env.tiny / "tokenizer"))

        with mock.patch.object(CLIPTokenizer, "from_pretrained", from_pretrained):
            load_phase(spec, env)
        return tuple(calls)

    probe.__name__ = probe.__qualname__ = name
    return probe


def _jax_load_phase(spec: spec_lib.RunSpec, env: Env) -> None:
    from jaxbooth.jax_backend import loading

    loading.load_models(spec, loading.resolve_model_paths(spec))


jax_tokenizer_hub = tokenizer_calls(_jax_load_phase, "jax_tokenizer_hub")


def jax_paths(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """The model and VAE folders the load phase reads."""
    from jaxbooth.jax_backend import loading

    paths = loading.resolve_model_paths(spec)
    return str(paths.model_dir), str(paths.vae_dir)


def jax_loaded(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """How the load phase builds the modules: compute dtype, attention kernel, remat, tokenizer."""
    from jaxbooth.jax_backend import loading

    models = loading.load_models(spec, loading.resolve_model_paths(spec))
    modules = (models.unet, models.text_encoder)
    return (tuple((str(getattr(m, "dtype", None)), getattr(m, "attention_kernel", None),
                   getattr(m, "gradient_checkpointing", None)) for m in modules),
            models.tokenizer.model_max_length, str(models.vae_dir))


def _inputs(spec: spec_lib.RunSpec, env: Env) -> Any:
    from jaxbooth.jax_backend import train

    return train.prepare_inputs(spec, SimpleNamespace(model_dir=env.tiny))


def jax_inputs(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """prepare_inputs: the dataset, seed, optimizer step count and output folder; the global batch."""
    from jaxbooth.jax_backend import train

    run = _inputs(spec, env)
    return dataset_summary(run.dataset), run.seed, run.max_train_steps, str(run.output_dir), \
        train.global_batch_size(spec)


def jax_inputs_or_error(spec: spec_lib.RunSpec, env: Env) -> Any:
    """jax_inputs, or the error the phase raises (a folder with an unreadable image)."""
    from jaxbooth.errors import JaxboothError

    try:
        return jax_inputs(spec, env)
    except JaxboothError as error:
        return f"error: {str(error).splitlines()[0][:60]}"


class _FakeSampler:
    """The class-image sampler's interface, recording the prompt batch of every generate call."""

    mesh = None

    def __init__(self, batches: list[int]):
        self.batches = batches

    def generate(self, prompts: list[str], **kwargs: Any) -> list:
        from PIL import Image

        self.batches.append(len(prompts))
        seeds = np.resize(np.asarray(kwargs.get("seed", 0)), len(prompts))
        return [Image.new("RGB", (16, 16), (int(seed) % 256, 0, 0)) for seed in seeds]


def jax_class_images(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """Generating the missing class images in prepare_inputs: the sampler's dtype and batch sizes."""
    from jaxbooth.jax_backend import class_images, train

    spec = spec_lib.replace_flat(spec, class_data_dir=str(env.fresh("class")))
    batches: list[int] = []
    built: list = []
    fake = recorder(built, lambda *a, **k: _FakeSampler(batches))
    with mock.patch.object(class_images, "sampler_from_loaded", fake):
        run = train.prepare_inputs(spec, env.jax_models)
    return tuple(batches), tuple(str(kwargs.get("dtype")) for _, kwargs in built), len(run.dataset.class_items)


def _pixels_as_latents(vae: Any, params: Any, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stands in for the VAE encoder: the 'posterior mean' is the pixel crop it was given."""
    mean = np.stack(list(pixels)).astype(np.float32)
    return mean, np.zeros_like(mean)


@contextlib.contextmanager
def decoding_threads(owner: Any, names: tuple[str, ...]):
    """Record the threads that decode images through ``owner.<name>`` (a worker pool shows here)."""
    import threading

    threads: set[str] = set()

    def wrap(real):
        def load(*args: Any, **kwargs: Any) -> Any:
            threads.add(threading.current_thread().name.rsplit("_", 1)[0])
            return real(*args, **kwargs)
        return load

    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(owner, name, wrap(getattr(owner, name))))
        yield threads


def jax_caches(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """build_caches on the prepared dataset, VAE replaced: which pixels get encoded (crops, flips,
    resize filter, resolution) on which threads, and the text conditioning (token ids, or the
    real frozen encoder's embeddings)."""
    from jaxbooth import data
    from jaxbooth.jax_backend import caches, encode

    run = _inputs(spec, env)
    with mock.patch.object(encode, "encode_pixel_stream", _pixels_as_latents), \
            decoding_threads(data, ("load_image", "load_image_with_info", "load_resized")) as threads:
        built = caches.build_caches(spec, env.jax_models, run.dataset, run.seed)
    frozen = {key: fingerprint(value) for key, value in sorted(built.frozen.items())}
    index = built.latent_index
    return frozen, tuple(index.crops.tolist()), index.orientations, tuple(built.prompts), tuple(sorted(threads))


def _fixed_grads(params: dict) -> list[dict]:
    """Eight seeded gradients of very different norms (some clipped at max_grad_norm=1, some not) and
    mixed signs, so sign-based rules (lion) see their betas too."""
    import jax

    rng = np.random.default_rng(0)
    scales = (5.0, 0.02, 3.0, 0.3, 0.01, 2.0, 0.05, 1.0)
    return [jax.tree.map(lambda p, s=s: (s * rng.normal(size=p.shape)).astype(np.float32), params) for s in scales]


def jax_optimizer(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """make_optimizer(run): four updates of a tiny param tree (a text_encoder group when trained)
    and the LR schedule over the first twelve optimizer steps."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxbooth.jax_backend import train

    run = _inputs(spec, env)
    tx, schedule = train.make_optimizer(run)
    params = {"unet": {"w": jnp.array([1.0, -2.0, 3.0])}}
    if spec.model.train_text_encoder:
        params["text_encoder"] = {"w": jnp.array([0.5, -0.5])}
    state = tx.init(params)
    for grads in _fixed_grads(params):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    values = {key: tuple(np.asarray(leaf).tolist()) for key, leaf in jax.tree_util.tree_leaves_with_path(params)
              for key in [jax.tree_util.keystr(key)]}
    return tuple(sorted(values.items())), tuple(float(schedule(i)) for i in range(12))


def jax_loss(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """One micro-step's loss (train_step.compute_loss) with the backend's loss_options, a stand-in
    UNet (x -> 0.5 x) and fixed posteriors: Min-SNR, offset noise, prior rows and their weight."""
    import jax
    import jax.numpy as jnp

    from jaxbooth.jax_backend import train, train_step

    options = train.loss_options(spec, env.jax_models)
    rng = np.random.default_rng(0)
    frozen = {"latent_mean": jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
              "latent_std": jnp.full((2, 8, 8, 4), 0.1, jnp.float32),
              "text_embeddings": jnp.zeros((1, 77, 32), jnp.float32)}
    batch = {"example_idx": jnp.array([0, 1]), "prompt_idx": jnp.array([0, 0])}  # instance row, then class row
    results = []
    for step in range(4):  # four draws of timesteps and noise
        loss, aux = train_step.compute_loss(
            {"unet": {"s": jnp.float32(0.5)}}, frozen, batch, jax.random.PRNGKey(step),
            unet_apply=lambda variables, x, t, context: x * variables["params"]["s"], text_apply=None,
            tables=env.jax_models.noise_schedule.as_tables(), options=options)
        results.append((float(loss), float(aux["instance_loss"]), float(aux["prior_loss"])))
    return tuple(results)


def jax_validator(spec: spec_lib.RunSpec, env: Env) -> Any:
    """make_validator: None without a prompt; else the sampler, and the prompts one validation samples."""
    from jaxbooth.jax_backend import train

    validator = train.make_validator(spec, env.jax_models, output_dir=env.fresh("validation"), seed=0)
    if validator is None:
        return None
    sampled: list = []
    with mock.patch.object(validator.sampler, "generate", recorder(sampled, lambda *a, **k: [])):
        validator.generate(unet_params=None)
    (prompts,), kwargs = sampled[0]
    return validator.sampler.sampler_name, tuple(prompts), kwargs.get("seed")


class _FakeWriter:
    """CheckpointWriter's interface: records the steps it is asked to save."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def save(self, step: int, *args: Any, **kwargs: Any) -> None:
        self.steps.append(step)

    def wait(self) -> None:
        pass


def jax_loop(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """run_loop with a stand-in compiled step: micro-steps run, steps logged to metrics.jsonl, saved
    and validated (the real Validator's cadence, its sampling recorded instead of run)."""
    import jax
    import jax.numpy as jnp

    from jaxbooth import data, output
    from jaxbooth.jax_backend import mesh as mesh_lib
    from jaxbooth.jax_backend import train

    spec = spec_lib.replace_flat(spec, output_dir=str(env.fresh("loop")))
    run = _inputs(spec, env)
    mesh = mesh_lib.make_mesh(spec_lib.mesh_shape(spec, jax.device_count()))
    batch_size = train.global_batch_size(spec)
    iterator = data.BatchIterator(run.dataset, resolution=spec.data.resolution, batch_size=batch_size, seed=run.seed)
    micro_steps: list[int] = []

    def compiled(state: Any, frozen: Any, batch: Any) -> tuple:
        micro_steps.append(int(batch["example_idx"].shape[0]))
        metrics = {name: jnp.float32(0.5) for name in (*output.LOSS_METRICS, "grad_norm", "lr")}
        return state.replace(step=state.step + 1), metrics

    def rows(iterator: Any, epoch: int, position: int) -> dict:
        return {"example_idx": np.zeros(batch_size, np.int32), "prompt_idx": np.zeros(batch_size, np.int32)}

    shardings = {key: mesh_lib.batch_sharding(mesh) for key in ("example_idx", "prompt_idx")}
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params={"unet": {"w": jnp.ones(2)}}, opt_state=None,
                             rng=None)
    validator = train.make_validator(spec, env.jax_models, output_dir=run.output_dir, seed=run.seed, mesh=mesh)
    validated: list = []
    writer = _FakeWriter()
    with contextlib.ExitStack() as stack:
        if validator is not None:
            stack.enter_context(mock.patch.object(validator, "run", recorder(validated)))
        train.run_loop(run, compiled, state, {}, iterator, rows, shardings, writer, None, validator)
    logged = [line for line in (run.output_dir / output.METRICS_FILENAME).read_text().splitlines() if line]
    import json

    return (len(micro_steps), tuple(json.loads(line)["step"] for line in logged), tuple(writer.steps),
            tuple(args[0] for args, _ in validated))


def jax_configure(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """configure_jax: the persistent compilation cache folder and the jax.distributed.initialize call."""
    import jax

    from jaxbooth.jax_backend import train

    before = jax.config.jax_compilation_cache_dir
    calls: list = []
    try:
        with mock.patch.object(jax.distributed, "initialize", recorder(calls)):
            train.configure_jax(spec)
        cache_dir = jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    return str(cache_dir).startswith(str(spec.precision.compilation_cache_dir or "<none>")), \
        tuple(tuple(sorted(kwargs.items())) for _, kwargs in calls)


def jax_mesh(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """The (data, fsdp) mesh train() asks for: stops train() at spec.mesh_shape (after configure_jax,
    which is skipped here) and evaluates it for an 8-device slice, as on a TPU v4-8."""
    from jaxbooth.jax_backend import train

    with mock.patch.object(train, "configure_jax", lambda spec: None), \
            stop_at(spec_lib, "mesh_shape", call_through=False) as seen:
        train.train(spec)
    asked, device_count = seen["args"]
    return spec_lib.mesh_shape(asked, 8), device_count >= 1


def jax_progress(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """metrics.Progress (built by run_loop): which trackers exist and where TensorBoard writes."""
    from jaxbooth.jax_backend import metrics

    out = env.fresh("progress")
    progress = metrics.Progress(spec, out, total=3)
    created = tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir()))
    return progress.tensorboard is None, progress.wandb is None, created


def jax_saved_components(spec: spec_lib.RunSpec, env: Env) -> Any:
    """save_pipeline: which trained components it writes (stopped at output.components_to_save)."""
    from jaxbooth import output
    from jaxbooth.jax_backend import train

    run = _inputs(spec, env)
    with stop_at(output, "components_to_save") as seen:
        train.save_pipeline(run, env.jax_models, {}, 1)
    return seen["result"]


def jax_finish(spec: spec_lib.RunSpec, env: Env) -> tuple:
    """The end of a run (train._finish): what it uploads to a fake Hub, with the pipeline writing stubbed."""
    import jax.numpy as jnp

    from jaxbooth.jax_backend import train

    run = _inputs(spec_lib.replace_flat(spec, output_dir=str(env.root / "finish-jax")), env)
    state = train.TrainState(step=jnp.int32(2), params={"unet": {"w": np.ones(2)}}, opt_state=None, rng=None)
    with mock.patch.object(train, "save_pipeline", lambda run, *a, **k: run.output_dir), fake_hub() as uploads:
        train._finish(run, env.jax_models, state, ())
    return tuple(uploads)


@contextlib.contextmanager
def fake_hub():
    """huggingface_hub's create_repo and upload_folder, recorded: yields [(repo, folder name, token)]."""
    import huggingface_hub

    uploads: list = []

    def create_repo(repo_id: str, **kwargs: Any) -> Any:
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(*, repo_id: str, folder_path: str, token: Any = None, **kwargs: Any) -> None:
        uploads.append((repo_id, Path(folder_path).name, token))

    with mock.patch.object(huggingface_hub, "create_repo", create_repo), \
            mock.patch.object(huggingface_hub, "upload_folder", upload_folder):
        yield uploads


def captured_stderr(call) -> str:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        call()
    return err.getvalue()


def source_mentions(path: Path, text: str) -> bool:
    return text in path.read_text()
