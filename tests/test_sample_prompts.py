"""``--sample_prompts`` (kohya's per-prompt settings): the parser, the cadence, the grid, and one short
run per backend that samples a file of prompts of different sizes into a grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import sample_prompts as sp
from jaxbooth.errors import JaxboothError
from jaxbooth.validation_files import image_grid
from tests._logs import logged_warning


def write(tmp_path: Path, text: str, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read(path: Path, **kwargs) -> list[sp.SamplePrompt]:
    return sp.read_sample_prompts(path, **{"resolution": 64, "seed": 3, **kwargs})


# ------------------------------------------------------------------ parser


def test_options_comments_blank_lines_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# a comment line\n\n"
                           "a photo of sks dog --n blurry, low quality --W 512 --h 768 --s 30 --l 5.5 --d 42\n"
                           "   \n"
                           "a dog on a beach\n"
                           "  # indented comment\n"
                           "a cat --ss euler --d 0\n")
    first, second, third = read(path)
    assert first == sp.SamplePrompt(prompt="a photo of sks dog", negative="blurry, low quality", width=512,
                                    height=768, steps=30, guidance=5.5, seed=42, sampler=None,
                                    source=f"{path}:3")
    # defaults: the run's resolution, the validation step count, guidance 7.5, a seed from (run seed, index)
    assert (second.width, second.height, second.steps, second.guidance, second.negative, second.sampler) == (
        64, 64, sp.DEFAULT_STEPS, 7.5, None, None)
    assert second.seed == sp.derived_seed(3, 1) and second.source == f"{path}:5"
    assert third.sampler == "EulerDiscreteScheduler" and third.seed == 0


def test_derived_seeds_differ_per_prompt_and_follow_the_run_seed(tmp_path: Path) -> None:
    path = write(tmp_path, "a\nb\nc\n")
    seeds = [p.seed for p in read(path)]
    assert len(set(seeds)) == 3 and seeds == [p.seed for p in read(path)]
    assert seeds != [p.seed for p in read(path, seed=4)]


@pytest.mark.parametrize("line, message", [
    ("a dog --w 100", r"prompts.txt:2: --w 100 is not a multiple of 8 .*use 96 or 104"),
    ("a dog --h 0", r"prompts.txt:2: --h 0 is out of range"),
    ("a dog --s 0", r"prompts.txt:2: --s 0 is out of range; give 1 to 1000"),
    ("a dog --s many", r"prompts.txt:2: --s 'many' is not a whole number"),
    ("a dog --d -1", r"prompts.txt:2: --d -1 is out of range"),
    ("a dog --l x", r"prompts.txt:2: --l 'x' is not a number"),
    ("a dog --x 3", r"prompts.txt:2: unknown option --x; the options are --n"),
    ("a dog --ww 64", r"prompts.txt:2: unknown option --ww \(did you mean --w\?\)"),
    ("a dog --w 64 --w 72", r"prompts.txt:2: --w is given twice"),
    ("a dog --n", r"prompts.txt:2: --n has no value"),
    ("--w 64 --h 64", r"prompts.txt:2: no prompt before the options"),
    ("a dog --cn pose.png", r"prompts.txt:2: --cn \(a ControlNet image\) is not supported"),
    ("a dog --ss euler_a", r"prompts.txt:2: --ss 'euler_a' is not a sampler both backends have"),
])
def test_a_bad_line_is_an_error_naming_file_line_and_fix(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, f"a good prompt --w 64\n{line}\n")
    with pytest.raises(JaxboothError, match=message):
        read(path)


def test_missing_or_empty_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(JaxboothError, match="no such file"):
        read(tmp_path / "nope.txt")
    with pytest.raises(JaxboothError, match="no prompts"):
        read(write(tmp_path, "# only a comment\n\n"))


def test_kohya_flow_model_options_are_ignored_with_a_warning(tmp_path: Path) -> None:
    with logged_warning(r"prompts.txt:1: --g \(distilled guidance\) is a kohya option for flow models"):
        (prompt,) = read(write(tmp_path, "a dog --g 3.5 --w 64\n"))
    assert prompt.width == 64 and prompt.guidance == 7.5


def test_toml_and_json_forms(tmp_path: Path) -> None:
    toml = write(tmp_path, '[prompt]\nwidth = 64\nsample_steps = 4\n\n'
                           '[[prompt.subset]]\nprompt = "a dog"\nseed = 1\n\n'
                           '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "blurry"\nheight = 32\n',
                 "prompts.toml")
    dog, cat = read(toml)
    assert (dog.prompt, dog.width, dog.height, dog.steps, dog.seed) == ("a dog", 64, 64, 4, 1)
    assert (cat.prompt, cat.negative, cat.height, cat.source) == ("a cat", "blurry", 32,
                                                                  f"{toml}: [[prompt.subset]] #2")
    data = ["a dog --w 32", {"prompt": "a cat", "scale": 3, "sample_sampler": "ddim"}]
    line, table = read(write(tmp_path, json.dumps(data), "prompts.json"))
    assert line.width == 32 and (table.guidance, table.sampler) == (3.0, "DDIMScheduler")
    with pytest.raises(JaxboothError, match=r"prompts.json: entry 0: unknown key 'widht' \(did you mean 'width'"):
        read(write(tmp_path, json.dumps([{"prompt": "a", "widht": 64}]), "prompts.json"))


# ------------------------------------------------------------------ cadence and files


def test_cadence_is_kohyas() -> None:
    steps, epochs = ("steps", 2), ("epochs", 2)
    assert [s for s in range(7) if sp.should_sample(steps, s)] == [2, 4, 6]
    assert not sp.should_sample(epochs, 4) and not sp.should_sample(epochs, 4, 1)
    assert sp.should_sample(epochs, 4, 2) and sp.should_sample(epochs, 9, 4) and not sp.should_sample(epochs, 9, 3)
    assert not sp.should_sample(None, 2, 2)


def test_schedule_from_the_spec(tmp_path: Path) -> None:
    from jaxbooth import spec as spec_lib

    base = spec_lib.RunSpec()
    assert sp.sample_schedule(base) is None
    path = str(write(tmp_path, "a dog\n"))
    only_file = spec_lib.replace_flat(base, sample_prompts=path)
    assert sp.sample_schedule(only_file) is None and sp.spec_sample_prompts(only_file) == []  # as kohya
    steps = spec_lib.replace_flat(only_file, sample_every_n_steps=5)
    assert sp.sample_schedule(steps) == ("steps", 5) and len(sp.spec_sample_prompts(steps)) == 1
    both = spec_lib.replace_flat(steps, sample_every_n_epochs=2)
    assert sp.sample_schedule(both) == ("epochs", 2)  # epochs win, as in kohya (spec validation warns)


def test_grid_pads_each_cell_to_the_largest_sample(tmp_path: Path) -> None:
    images = [Image.new("RGB", size, color) for size, color in
              (((32, 32), "red"), ((48, 32), "green"), ((32, 48), "blue"))]
    grid = image_grid(images)
    assert grid.size == (2 * 48, 2 * 48)  # ceil(sqrt(3)) = 2 columns, 2 rows of 48 x 48 cells
    pixels = np.asarray(grid)
    assert tuple(pixels[24, 24]) == (255, 0, 0) and tuple(pixels[2, 2]) == (0, 0, 0)  # centred, padded black
    assert tuple(pixels[24, 48]) == (0, 128, 0) and tuple(pixels[48 + 24, 24]) == (0, 0, 255)
    path = sp.save_samples(images, tmp_path, 100)
    assert path == tmp_path / "samples" / "step-000100.png" and Image.open(path).size == (96, 96)
    assert [Image.open(tmp_path / "samples" / "step-000100" / f"{k:02d}.png").size for k in range(3)] == [
        (32, 32), (48, 32), (32, 48)]


# ------------------------------------------------------------------ one short run per backend

# prompt 3 repeats prompt 0 without --d (a seed of its own); prompt 2 repeats prompt 0 with its --d
PROMPTS = ("# kohya's form\n"
           "a photo of sks toy --w 32 --h 32 --s 2 --d 5\n"
           "a toy on a beach --n blurry --w 48 --h 32 --s 2 --l 3\n"
           "a photo of sks toy --w 32 --h 32 --s 2 --d 5\n"
           "a photo of sks toy --w 32 --h 32 --s 2\n")
SIZES = [(32, 32), (48, 32), (32, 32), (32, 32)]


def one_image_folder(root: Path) -> Path:
    """One bundled image, so one epoch is one step at batch size 1."""
    from jaxbooth import data

    folder = root / "instance"
    folder.mkdir()
    shutil.copy(sorted(data.example_instance_dir().iterdir())[0], folder)
    return folder


def check_samples(out: Path, step: int) -> list[np.ndarray]:
    grid = Image.open(sp.grid_path(out, step))
    assert grid.size == (2 * 48, 2 * 32), "4 prompts: 2 x 2 cells of the largest sample (48 x 32)"
    singles = [Image.open(sp.image_path(out, step, k)) for k in range(4)]
    assert [image.size for image in singles] == SIZES
    arrays = [np.asarray(image) for image in singles]
    assert np.array_equal(arrays[0], arrays[2]), "the same --d seed and settings gave a different image"
    assert not np.array_equal(arrays[0], arrays[3]), "a prompt without --d reused prompt 0's seed"
    return arrays


def test_jax_run_samples_the_prompt_file_every_n_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--sample_prompts with --sample_every_n_steps=1 on the JAX backend: a grid and one file per prompt at
    each step, sized per prompt, --d seeds reproducible, the grid in TensorBoard."""
    from jaxbooth.cli import main

    prompts = write(tmp_path, PROMPTS)
    out = tmp_path / "out"
    assert main(["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}",
                 "--backend=jax", "--resolution=32", "--train_batch_size=1", "--max_train_steps=2", "--seed=0",
                 "--report_to=tensorboard", f"--sample_prompts={prompts}", "--sample_every_n_steps=1"]) == 0
    for step in (1, 2):
        check_samples(out, step)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000001.png", "step-000002.png"]
    assert not (out / "validation").exists()  # no validation_prompt: samples only
    events = b"".join(p.read_bytes() for p in (out / "logs").rglob("events.out.tfevents.*"))
    assert b"samples/0" in events


@pytest.mark.requires_torch
def test_torch_run_samples_the_prompt_file_every_n_epochs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--sample_prompts with --sample_every_n_epochs=2 on the torch backend (one image: an epoch a step): a
    grid and one file per prompt after epoch 2 only, sized per prompt, --d seeds reproducible."""
    pytest.importorskip("torch")
    from jaxbooth.cli import main

    prompts = write(tmp_path, PROMPTS)
    out = tmp_path / "out"
    assert main(["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}",
                 f"--instance_data_dir={one_image_folder(tmp_path)}", "--instance_prompt=a photo of sks toy",
                 "--backend=torch", "--resolution=32",
                 "--train_batch_size=1", "--max_train_steps=3", "--seed=0", "--report_to=none",
                 f"--sample_prompts={prompts}", "--sample_every_n_epochs=2"]) == 0
    check_samples(out, 2)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png"]


def test_jax_validator_samples_every_n_epochs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """make_validator with --sample_prompts and --sample_every_n_epochs=2 (no validation_prompt): the loop's
    `should_run(step, epochs_done)` is true after epochs 2, 4, ... only (the JAX run test samples for real)."""
    from jaxbooth import spec as spec_lib
    from jaxbooth.jax_backend.validation import make_validator
    from tests._loaded import loaded_models

    spec = spec_lib.replace_flat(spec_lib.RunSpec(), resolution=32, sample_every_n_epochs=2,
                                 sample_prompts=str(write(tmp_path, "a dog --s 1\n")))
    models = loaded_models(tiny_model_dir)
    validator = make_validator(spec, models, output_dir=tmp_path / "out", seed=0)
    assert validator is not None and validator.prompt is None
    assert [epochs for epochs in range(1, 7) if validator.should_run(10, epochs)] == [2, 4, 6]
    assert not validator.should_run(10) and not validator.should_run(12, None)
    assert validator.should_run(12, 2) and validator._due == {12: (False, True)}  # run(12) samples, no validation


@pytest.mark.requires_torch
def test_torch_hook_samples_every_n_steps(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The torch loop's sample hook with --sample_every_n_steps=2 samples after steps 2 and 4 of 5 (main process
    only), epochs or not; the pipeline and its images are stand-ins (the torch run test samples for real)."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from jaxbooth import spec as spec_lib
    from jaxbooth.torch_backend import samples, validation

    spec = spec_lib.replace_flat(spec_lib.RunSpec(), resolution=32, sample_every_n_steps=2,
                                 sample_prompts=str(write(tmp_path, "a dog --w 32 --h 16\n")))
    run = SimpleNamespace(spec=spec, seed=0, output_dir=tmp_path / "out")
    m = SimpleNamespace(model_dir=tiny_model_dir, if_stage=None, is_sdxl=False)
    accelerator = SimpleNamespace(is_main_process=True, mixed_precision="no", device=torch.device("cpu"),
                                  trackers=[], unwrap_model=lambda model: model)
    hook = samples.make_sample_hook(run, accelerator, m, unet=None, text_encoder=None, conditioner=None)
    monkeypatch.setattr(hook, "_pipeline", lambda: (SimpleNamespace(unet=torch.nn.Linear(1, 1)), None))
    calls = []
    monkeypatch.setattr(validation, "sample_prompt_images", lambda pipeline, prompts, **kw: calls.append(prompts)
                        or [Image.new("RGB", (p.width, p.height)) for p in prompts])
    for step in range(1, 6):  # as the loop: due(step, epochs_done), then the call
        if hook.due(step, step if step % 3 == 0 else None):
            hook(step)
    assert len(calls) == 2 and hook.written == ["samples/step-000002.png", "samples/step-000004.png"]
    assert Image.open(sp.image_path(run.output_dir, 4, 0)).size == (32, 16)
    accelerator.is_main_process = False
    hook(6)
    assert len(calls) == 2
