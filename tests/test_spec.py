"""Tests for jaxbooth.spec and jaxbooth.capabilities: schema, parsing, validation, routing.

Fast and framework-free: nothing here imports jax or torch. Expected diffusers values are
hard-coded from diffusers main 58eb52c (train_dreambooth.py, train_dreambooth_lora*.py) and
v0.39.0 (train_dreambooth_flax.py), so a drifting default fails a test.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from jaxbooth import spec as S
from jaxbooth.capabilities import CAPABILITIES, JAX_MIN_GPU_MEMORY_BYTES, unsupported_options
from jaxbooth.errors import JaxboothError
from tests._diffusers_scripts import SCRIPT_DEFAULTS
from tests._logs import WarningCollector

REPO = Path(__file__).resolve().parents[1]
GUIDE = Path("/work/shared/seed/000_04c4b3fb169f5d91.txt")
GB = 10**9


def load(*args: str, **kw) -> S.RunSpec:
    return S.load_spec(list(args), **kw)


@pytest.fixture
def spec_warnings() -> Iterator[list[str]]:
    """Warnings logged on the jaxbooth logger, by a handler of its own: the CLI's logging setup
    stops propagation, which would hide them from caplog."""
    handler, logger = WarningCollector(), logging.getLogger("jaxbooth")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def error_of(*args: str) -> str:
    with pytest.raises(JaxboothError) as info:
        load(*args)
    return str(info.value)


# --------------------------------------------------------------------------- schema vs diffusers



def test_defaults_equal_train_dreambooth_defaults():
    defaults = S.default_flat()
    wrong = {k: (defaults[k], v) for k, v in SCRIPT_DEFAULTS["train_dreambooth.py"].items() if defaults[k] != v}
    assert not wrong, f"ours vs diffusers: {wrong}"
    assert S.RunSpec().flat() == defaults


def test_every_diffusers_flag_is_a_field():
    missing = [name for defaults in SCRIPT_DEFAULTS.values() for name in defaults if name not in S.FIELDS]
    assert not missing


def test_choices_match_diffusers():
    assert S.FIELDS["mixed_precision"].choices == ("no", "fp16", "bf16")
    assert S.FIELDS["prior_generation_precision"].choices == ("no", "fp32", "fp16", "bf16")
    assert S.FIELDS["validation_scheduler"].choices == ("DPMSolverMultistepScheduler", "DDPMScheduler")
    assert set(S.FIELDS["lr_scheduler"].choices) == {
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "piecewise_constant"}


@pytest.mark.parametrize("preset, expected", [
    ("train_dreambooth_flax.py", {"output_dir": "text-inversion-model", "seed": 0, "mixed_precision": "no"}),
    ("train_dreambooth_lora.py", {"output_dir": "lora-dreambooth-model", "learning_rate": 5e-4,
                                  "validation_epochs": 50, "image_interpolation_mode": "lanczos",
                                  "use_lora": True, "rank": 4}),
    ("train_dreambooth_lora_sdxl.py", {"resolution": 1024, "learning_rate": 1e-4, "text_encoder_lr": 5e-6,
                                       "adam_weight_decay": 1e-4, "adam_weight_decay_text_encoder": 1e-3,
                                       "optimizer": "adamw", "model_family": "sdxl"}),
])
def test_script_presets_reproduce_that_scripts_defaults(preset, expected):
    flat = load(preset=preset).flat()
    assert {k: flat[k] for k in expected} == expected
    assert load("--resolution=768", preset=preset).data.resolution == 768  # flags still win


def test_flat_names_are_unique_and_sections_cover_them():
    per_section = [f.name for cls in S.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(per_section) == len(set(per_section)) == len(S.FIELDS) - 1  # + backend
    assert all(info.doc for info in S.FIELDS.values())


# --------------------------------------------------------------------------- the guide's commands

ENV = {"MODEL_NAME": "model-dir", "INSTANCE_DIR": "dog", "OUTPUT_DIR": "out",
       "VALIDATION_IMAGES": "dog_downsized/image_1.png dog_downsized/image_2.png "
                            "dog_downsized/image_3.png dog_downsized/image_4.png"}

# Each training command line of the guide, as printed (script name and all).
GUIDE_COMMANDS = {
    "bf16": 'accelerate launch train_dreambooth.py \\\n    --mixed_precision="bf16"',
    "min_snr": "accelerate launch train_dreambooth.py \\\n  --snr_gamma=5.0",
    "prior": 'accelerate launch train_dreambooth.py \\\n  --with_prior_preservation \\\n'
             '  --prior_loss_weight=1.0 \\\n  --class_data_dir="path/to/class/images" \\\n'
             '  --class_prompt="text prompt describing class"',
    "text_encoder": "accelerate launch train_dreambooth.py \\\n  --train_text_encoder",
    "16GB": "accelerate launch train_dreambooth.py \\\n  --gradient_checkpointing \\\n  --use_8bit_adam \\",
    "12GB": "accelerate launch train_dreambooth.py \\\n  --use_8bit_adam \\\n  --gradient_checkpointing \\\n"
            "  --enable_xformers_memory_efficient_attention \\\n  --set_grads_to_none \\",
    "pytorch": """accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=400 \\
  --push_to_hub""",
    "flax": """python train_dreambooth_flax.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --learning_rate=5e-6 \\
  --max_train_steps=400 \\
  --push_to_hub""",
    "if_stage1_lora": """accelerate launch train_dreambooth_lora.py \\
  --report_to wandb \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a sks dog" \\
  --resolution=64 \\
  --train_batch_size=4 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --scale_lr \\
  --max_train_steps=1200 \\
  --validation_prompt="a sks dog" \\
  --validation_epochs=25 \\
  --checkpointing_steps=100 \\
  --pre_compute_text_embeddings \\
  --tokenizer_max_length=77 \\
  --text_encoder_use_attention_mask""",
    "if_stage2_lora": """python train_dreambooth_lora.py \\
    --report_to wandb \\
    --pretrained_model_name_or_path=$MODEL_NAME \\
    --instance_data_dir=$INSTANCE_DIR \\
    --output_dir=$OUTPUT_DIR \\
    --instance_prompt="a sks dog" \\
    --resolution=256 \\
    --train_batch_size=4 \\
    --gradient_accumulation_steps=1 \\
    --learning_rate=1e-6 \\
    --max_train_steps=2000 \\
    --validation_prompt="a sks dog" \\
    --validation_epochs=100 \\
    --checkpointing_steps=500 \\
    --pre_compute_text_embeddings \\
    --tokenizer_max_length=77 \\
    --text_encoder_use_attention_mask \\
    --validation_images $VALIDATION_IMAGES \\
    --class_labels_conditioning=timesteps""",
    "if_stage1_full": """accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=64 \\
  --train_batch_size=4 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=1e-7 \\
  --max_train_steps=150 \\
  --validation_prompt "a photo of sks dog" \\
  --validation_steps 25 \\
  --text_encoder_use_attention_mask \\
  --tokenizer_max_length 77 \\
  --pre_compute_text_embeddings \\
  --use_8bit_adam \\
  --set_grads_to_none \\
  --skip_save_text_encoder \\
  --push_to_hub""",
    "if_stage2_full": """accelerate launch train_dreambooth.py \\
  --report_to wandb \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a sks dog" \\
  --resolution=256 \\
  --train_batch_size=2 \\
  --gradient_accumulation_steps=6 \\
  --learning_rate=5e-6 \\
  --max_train_steps=2000 \\
  --validation_prompt="a sks dog" \\
  --validation_steps=150 \\
  --checkpointing_steps=500 \\
  --pre_compute_text_embeddings \\
  --tokenizer_max_length=77 \\
  --text_encoder_use_attention_mask \\
  --validation_images $VALIDATION_IMAGES \\
  --class_labels_conditioning timesteps \\
  --push_to_hub""",
}
# The guide's progress-images snippet has no script line; it is appended to a command.
VALIDATION_SNIPPET = ('--validation_prompt="a photo of a sks dog"\n--num_validation_images=4\n'
                      '--validation_steps=100')


def jaxbooth_argv(command: str) -> list[str]:
    """What follows `jaxbooth train` when the user swaps it in for the script: shell-split
    after expanding $VARS, with the launcher and script name dropped."""
    text = re.sub(r"\\\s*(\n|$)", " ", command)
    text = re.sub(r"\$(\w+)", lambda m: ENV[m.group(1)], text)
    tokens = shlex.split(text)
    script = next(i for i, t in enumerate(tokens) if re.fullmatch(r"train_dreambooth\w*\.py", t))
    return tokens[script + 1:]


def guide_commands(text: str) -> list[str]:
    """Every command in the guide's ```bash blocks that runs a train_dreambooth*.py script."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        match = re.search(r"^(accelerate launch|python) train_dreambooth\w*\.py.*", block, flags=re.S | re.M)
        if match:
            found.append(match.group(0).rstrip())
    return found


@pytest.mark.skipif(not GUIDE.exists(), reason="the seed guide is not in this checkout")
def test_guide_commands_are_the_ones_tested_here():
    assert [c.strip() for c in guide_commands(GUIDE.read_text(encoding="utf-8"))] == \
        [c.strip() for c in GUIDE_COMMANDS.values()]


def given_values(argv: list[str]) -> dict[str, object]:
    """Flag -> the text the user wrote (True for a bare flag, a list for several values)."""
    given: dict[str, object] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            following = []
            for t in argv[i + 1:]:
                if t.startswith("--"):
                    break
                following.append(t)
            values = ([value] if eq else []) + following
            given[key] = True if not values else values[0] if len(values) == 1 else values
    return given


@pytest.mark.parametrize("name", list(GUIDE_COMMANDS))
def test_guide_command_parses_with_jaxbooth_train(name, spec_warnings):
    argv = jaxbooth_argv(GUIDE_COMMANDS[name])
    flat = load(*argv).flat()
    assert spec_warnings == []
    for key, text in given_values(argv).items():
        value = flat[key]
        if text is True or isinstance(text, list):
            assert value == (True if text is True else tuple(text)), key
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == type(value)(float(text)), key
        else:
            assert value == text, key


def test_guide_pytorch_command_values():
    spec = load(*jaxbooth_argv(GUIDE_COMMANDS["pytorch"]))
    assert spec.model.pretrained_model_name_or_path == "model-dir"
    assert (spec.data.instance_data_dir, spec.data.instance_prompt) == ("dog", "a photo of sks dog")
    assert spec.checkpointing.output_dir == "out"
    assert (spec.optim.train_batch_size, spec.optim.learning_rate, spec.optim.lr_warmup_steps) == (1, 5e-6, 0)
    assert spec.optim.max_train_steps == 400 and spec.hub.push_to_hub is True


def test_guide_if_stage2_command_values():
    spec = load(*jaxbooth_argv(GUIDE_COMMANDS["if_stage2_full"]))
    assert spec.validation.validation_images == tuple(ENV["VALIDATION_IMAGES"].split())
    assert spec.deepfloyd_if.class_labels_conditioning == "timesteps"
    assert spec.hub.push_to_hub and spec.logging.report_to == "wandb"
    assert spec.optim.gradient_accumulation_steps == 6


def test_guide_validation_snippet_parses():
    argv = jaxbooth_argv(GUIDE_COMMANDS["pytorch"]) + shlex.split(VALIDATION_SNIPPET)
    assert S.validation_schedule(load(*argv)) == ("steps", 100)


@pytest.mark.parametrize("how", ["keyword", "flag", "script"])
def test_guide_lora_command_trains_lora_with_the_lora_preset(how):
    argv = jaxbooth_argv(GUIDE_COMMANDS["if_stage1_lora"])
    if how == "flag":
        spec = load("--preset=train_dreambooth_lora", *argv)
    elif how == "script":  # the guide's command with `accelerate launch` swapped for `jaxbooth train`
        spec = load("examples/dreambooth/train_dreambooth_lora.py", *argv)
    else:
        spec = load(*argv, preset="train_dreambooth_lora.py")
    assert spec.lora.use_lora and spec.optim.learning_rate == 5e-6  # the flag beats the preset's 5e-4
    assert spec.checkpointing.output_dir == "out" and spec.data.image_interpolation_mode == "lanczos"
    assert S.validation_schedule(spec) == ("epochs", 25)
    assert "unknown preset" in error_of("--preset=train_lora.py")


# --------------------------------------------------------------------------- CLI syntax


def test_cli_value_forms():
    spec = load("--resolution", "256", "--learning_rate=1e-4", "--local_rank", "-1", "--center_crop",
                "--scale_lr=false", "--optimizer=prodigy", "--prodigy_decouple", "False",
                "--train-batch-size=2")
    assert spec.data.resolution == 256 and spec.optim.learning_rate == 1e-4
    assert spec.data.center_crop is True and spec.optim.scale_lr is False
    assert spec.optim.prodigy_decouple is False and spec.optim.train_batch_size == 2


def test_cli_last_flag_wins_and_choices_are_case_insensitive():
    spec = load("--seed=1", "--seed=2", "--optimizer=AdamW", "--validation_scheduler=ddpmscheduler")
    assert spec.optim.seed == 2 and spec.optim.optimizer == "adamw"
    assert spec.validation.validation_scheduler == "DDPMScheduler"


def test_cli_optional_can_be_reset_to_none():
    assert load("--max_train_steps=none").optim.max_train_steps is None
    assert load("--mixed_precision=no").precision.mixed_precision == "no"  # 'no' is a choice, not None


@pytest.mark.parametrize("argv, fragment", [
    (["--learning_rat=1e-5"], "did you mean --learning_rate"),
    (["--with_prior_preservaton"], "did you mean --with_prior_preservation"),
    (["--resolution=abc"], "resolution='abc' is not an integer"),
    (["--resolution=512.5"], "is not an integer"),
    (["--learning_rate=fast"], "is not a number"),
    (["--push_to_hub=maybe"], "is not true or false"),
    (["--lr_scheduler=cosin"], "did you mean 'cosine'"),
    (["--mixed_precision=fp32"], "one of no, fp16, bf16"),
    (["--backend=tpu"], "one of auto, jax, torch"),
    (["--attention=splash"], "one of auto, xla, dot_product, flash"),
    (["--report_to=tensorbord"], "did you mean 'tensorboard'"),
    (["--validation_images"], "needs one or more values"),
    (["--resolution"], "--resolution needs a value"),
    (["dog"], "unknown script 'dog'; expected one of the diffusers DreamBooth scripts train_dreambooth.py"),
    (["--seed=1", "dog"], "unexpected argument 'dog'"),
    (["--resolution", "512", "768"], "unexpected argument '768'"),
])
def test_cli_errors_name_key_value_and_fix(argv, fragment):
    assert fragment in error_of(*argv)


# --------------------------------------------------------------------------- YAML


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_nested_flat_and_cli_precedence(tmp_path):
    text = "optim:\n  learning_rate: 1e-5\n  train_batch_size: 2\nresolution: 256\n"
    path = write(tmp_path, "run.yaml", text)
    spec = load("--config", path, "--train_batch_size=3")
    assert spec.optim.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as text; the field types it
    assert spec.data.resolution == 256 and spec.optim.train_batch_size == 3


@pytest.mark.parametrize("text, fragment", [
    ("learning_rat: 1.0e-5\n",
     "run.yaml:1: learning_rat: unknown key; did you mean --learning_rate (section optim)?"),
    ("optim:\n  seed: 1\n  learning_rat: 1.0e-5\n", "run.yaml:3: optim.learning_rat"),
    ("data:\n  learning_rate: 1.0e-5\n", "belongs to section 'optim'"),
    ("optm:\n  seed: 1\n", "did you mean section 'optim'"),
    ("optim: 3\n", "section 'optim' must be a mapping"),
    ("optim:\n  seed: 1\nseed: 2\n", "seed is also set at"),
    ("seed: 1\nseed: 2\n", "run.yaml:2: key 'seed' repeats the one on line 1"),
    ("optim:\n  train_batch_size: [1\n", "run.yaml"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("resolution: big\n", "run.yaml:1: resolution='big' is not an integer; use e.g. resolution: 512"),
])
def test_yaml_errors_name_file_line_and_fix(tmp_path, text, fragment):
    path = write(tmp_path, "run.yaml", text)
    message = error_of("--config", path)
    assert fragment in message and "run.yaml" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "run.yaml", "seed: 1\noptim:\n  lr: [1, 2\nother: 3\n")
    assert re.search(r"run\.yaml:\d+: invalid YAML", error_of("--config", path))


def test_yaml_missing_file():
    assert "nope.yaml: config file not found" in error_of("--config", "nope.yaml")


def test_yaml_extends_and_loop(tmp_path):
    write(tmp_path, "base.yaml", "optim:\n  seed: 1\n  train_batch_size: 8\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\noptim:\n  train_batch_size: 2\n")
    spec = load("--config", child)
    assert (spec.optim.seed, spec.optim.train_batch_size) == (1, 2)
    loop = write(tmp_path, "loop.yaml", "extends: loop.yaml\n")
    assert "loops back" in error_of("--config", loop)


def test_yaml_value_error_cites_file_line(tmp_path):
    path = write(tmp_path, "run.yaml", "optim:\n  learning_rate: 0\n")
    assert "run.yaml:2: optim.learning_rate=0.0: must be > 0" in error_of("--config", path)


def test_load_spec_from_dict_nested_and_flat():
    spec = S.load_spec_from_dict({"backend": "jax", "optim": {"seed": 3}, "resolution": 64})
    assert (spec.backend, spec.optim.seed, spec.data.resolution) == ("jax", 3, 64)
    with pytest.raises(JaxboothError, match="did you mean --resolution"):
        S.load_spec_from_dict({"resolutoin": 64})


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("argv, fragment", [
    (["--with_prior_preservation", "--class_data_dir=c"], "needs --class_prompt"),
    (["--with_prior_preservation", "--class_prompt=a dog"], "needs --class_data_dir"),
    (["--max_train_steps=0"], "--max_train_steps=0: must be >= 1"),
    (["--max_train_steps=-5"], "must be >= 1"),
    (["--num_train_epochs=0"], "--num_train_epochs=0: must be >= 1"),
    (["--train_batch_size=0"], "--train_batch_size=0: must be >= 1; the default is 4"),
    (["--sample_batch_size=0"], "must be >= 1"),
    (["--gradient_accumulation_steps=0"], "must be >= 1"),
    (["--learning_rate=0"], "--learning_rate=0.0: must be > 0"),
    (["--learning_rate=-1e-5"], "must be > 0"),
    (["--resolution=500"], "--resolution=500: not divisible by 8 (the VAE downsamples by 8); use 496 or 504"),
    (["--checkpoints_total_limit=0"], "--checkpoints_total_limit=0: must be >= 1"),
    (["--checkpointing_steps=0"], "must be >= 1"),
    (["--adam_beta2=1.0"], "must be >= 0 and < 1"),
    (["--train_text_encoder", "--pre_compute_text_embeddings"], "cannot be used with"),
    (["--report_to=wandb", "--hub_token=hf_x"], "hf auth login"),
    (["--validation_epochs=5", "--validation_steps=10"], "keep one"),
    (["--save_steps=10", "--checkpointing_steps=20"], "keep --checkpointing_steps"),
    (["--dataset_name=x/y", "--instance_data_dir=dog"], "only one source"),
    (["--use_8bit_adam", "--optimizer=lion"], "drop --use_8bit_adam"),
    (["--coordinator_address=h:1234"], "also needs --num_processes, --process_id"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"], "must be < --num_processes=2"),
    (["--data_parallelism=0"], "must be -1"),
    (["--pretrained_vae_name_or_path=a", "--pretrained_vae_model_name_or_path=b"], "different VAEs"),
    (["--rank=8"], "--rank=8 is a LoRA option, but LoRA mode is off; use `jaxbooth train train_dreambooth_lora.py"),
    (["--lr_scheduler=piecewise_constant"], "--lr_scheduler=piecewise_constant: needs step rules"),
    (["--backend=jax", "--mixed_precision=fp16"], "use --backend=torch or --mixed_precision=bf16"),
])
def test_contradictions_and_bad_values_are_rejected(argv, fragment):
    assert fragment in error_of(*argv)


def test_all_problems_are_reported_together():
    message = error_of("--train_batch_size=0", "--resolution=30", "--learning_rate=0")
    assert message.startswith("3 problems") and "train_batch_size" in message and "resolution" in message


@pytest.mark.parametrize("argv, fragment", [
    (["--class_data_dir=c"], "--class_data_dir='c' has no effect without --with_prior_preservation"),
    (["--class_prompt=dog"], "no effect without --with_prior_preservation"),
    (["--max_train_steps=10", "--num_train_epochs=3"], "--num_train_epochs=3 is ignored"),
    (["--validation_images", "a.png"], "no effect without --validation_prompt"),
    (["--prodigy_decouple=false"], "--prodigy_decouple=False has no effect unless --optimizer=prodigy"),
])
def test_suspicious_but_legal_specs_warn(argv, fragment, spec_warnings):
    load(*argv)
    assert [m for m in spec_warnings if fragment in m], spec_warnings


def test_warnings_are_logged_once_each_on_the_jaxbooth_logger(spec_warnings):
    load("--class_prompt=dog", "--max_train_steps=10", "--num_train_epochs=3")
    assert len(spec_warnings) == 2
    spec_warnings.clear()
    load()
    assert spec_warnings == []


def test_prior_preservation_with_both_keys_loads():
    spec = load("--with_prior_preservation", "--class_data_dir=cls", "--class_prompt=a dog")
    assert spec.prior.with_prior_preservation and spec.prior.class_data_dir == "cls"


def test_parsing_has_no_side_effects(tmp_path):
    out = tmp_path / "never" / "made"
    load(f"--output_dir={out}", f"--class_data_dir={out / 'c'}", "--with_prior_preservation",
         "--class_prompt=x", f"--logging_dir={out / 'l'}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- derived values


def test_effective_learning_rate_scales_like_diffusers():
    spec = load("--learning_rate=1e-6", "--train_batch_size=2", "--gradient_accumulation_steps=3")
    assert S.effective_learning_rate(spec, 4) == 1e-6
    scaled = S.replace_flat(spec, scale_lr=True)
    assert S.effective_learning_rate(scaled, 4) == pytest.approx(1e-6 * 3 * 2 * 4)
    assert S.effective_text_encoder_learning_rate(scaled, 4) == pytest.approx(2.4e-5)
    assert S.effective_text_encoder_learning_rate(S.replace_flat(scaled, text_encoder_lr=5e-6), 4) == 5e-6
    assert spec.optim.learning_rate == 1e-6  # never written back


def test_total_train_steps_follows_diffusers_rule():
    spec = load("--train_batch_size=2", "--num_train_epochs=3", "--gradient_accumulation_steps=1")
    # 5 examples -> 3 batches -> 2 per process on 2 processes -> 2 updates/epoch -> 6 steps
    assert S.num_update_steps_per_epoch(spec, 5, 2) == 2
    assert S.total_train_steps(spec, 5, 2) == 6
    accum = S.replace_flat(spec, gradient_accumulation_steps=4)
    assert S.total_train_steps(accum, 100, 1) == 3 * 13  # ceil(ceil(100/2)/4) = 13
    capped = S.replace_flat(spec, max_train_steps=7)
    assert S.total_train_steps(capped, 5, 2) == 7 and S.total_train_epochs(capped, 5, 2) == 4
    with pytest.raises(JaxboothError, match="empty"):
        S.total_train_steps(spec, 0, 1)


def test_mesh_shape():
    assert S.mesh_shape(load(), 8) == (8, 1)
    assert S.mesh_shape(load("--fsdp_parallelism=4"), 8) == (2, 4)
    with pytest.raises(JaxboothError, match="does not divide the 8 devices"):
        S.mesh_shape(load("--fsdp_parallelism=3"), 8)
    with pytest.raises(JaxboothError, match="there are 8 devices"):
        S.mesh_shape(load("--data_parallelism=2", "--fsdp_parallelism=2"), 8)


def test_small_derived_helpers():
    assert S.checkpoint_every_steps(load()) == 500
    assert S.checkpoint_every_steps(load("--save_steps=50")) == 50
    assert S.validation_schedule(load()) is None
    assert S.vae_name_or_path(load("--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix")) \
        == "madebyollin/sdxl-vae-fp16-fix"
    assert S.lora_scale_alpha(load("--use_lora", "--rank=8")) == 8.0


def test_get_and_replace_flat():
    spec = load()
    assert S.get_flat(spec, "learning_rate") == 5e-6 and S.get_flat(spec, "backend") == "auto"
    new = S.replace_flat(spec, resolution="256", validation_images=["a.png"])
    assert new.data.resolution == 256 and new.validation.validation_images == ("a.png",)
    assert spec.data.resolution == 512
    with pytest.raises(JaxboothError, match="did you mean --resolution"):
        S.replace_flat(spec, resolutio=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optim.seed = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- backends

TPU = S.DeviceInfo("tpu", 16 * 2**30, 8)
CPU = S.DeviceInfo("cpu", None, 1)
GPU80 = S.DeviceInfo("gpu", 80 * GB, 1)
GPU16 = S.DeviceInfo("gpu", 16 * GB, 1)


@pytest.mark.parametrize("device, backend, reason", [
    (TPU, "jax", "backend auto -> jax: TPU (8 devices)"),
    (CPU, "jax", "backend auto -> jax: CPU"),
    (GPU80, "jax", "backend auto -> jax: GPU with 80 GB"),
    (GPU16, "torch", "backend auto -> torch: GPU with 16 GB"),
    (S.DeviceInfo("cuda", JAX_MIN_GPU_MEMORY_BYTES, 2), "jax", ">= 30 GB"),
    (S.DeviceInfo("gpu", None, 1), "torch", "GPU memory unknown"),
])
def test_auto_backend_by_device(device, backend, reason):
    chosen, why = S.choose_backend(load(), device)
    assert chosen == backend and reason in why


def test_torch_only_option_routes_auto_to_torch_even_on_big_gpu():
    backend, why = S.choose_backend(load("--use_8bit_adam"), GPU80)
    assert (backend, why) == ("torch", "backend auto -> torch: --use_8bit_adam is torch-only")
    _, why = S.choose_backend(load(*jaxbooth_argv(GUIDE_COMMANDS["12GB"])), GPU80)
    assert "--use_8bit_adam, --enable_xformers_memory_efficient_attention, --set_grads_to_none are" in why


def test_jax_only_option_routes_auto_to_jax_on_small_gpu():
    assert S.choose_backend(load("--attention=flash"), GPU16) == (
        "jax", "backend auto -> jax: --attention=flash is jax-only")


def test_explicit_jax_with_torch_only_option_fails_at_load():
    message = error_of("--backend=jax", "--use_8bit_adam", "--allow_tf32")
    assert "--use_8bit_adam is only supported by the torch backend; use --backend=torch or drop it" in message
    assert "--allow_tf32 is only supported" in message


def test_explicit_backends_validate():
    assert S.choose_backend(load("--backend=jax"), GPU16) == ("jax", "backend jax (set explicitly)")
    with pytest.raises(JaxboothError, match="--fsdp_parallelism=2 is only supported by the jax backend"):
        load("--backend=torch", "--fsdp_parallelism=2")
    with pytest.raises(JaxboothError, match="does not run on TPU"):
        S.choose_backend(load("--backend=torch"), TPU)
    for backend in ("jax", "torch"):  # LoRA trains on both
        S.check_backend(load("--use_lora"), backend)
    assert S.choose_backend(load("--use_lora"), GPU80)[0] == "jax"
    assert S.choose_backend(load("--use_lora", "--lora_dropout=0.1"), GPU80)[0] == "torch"  # dropout: torch only
    with pytest.raises(JaxboothError, match="--lora_dropout=0.1 is only supported by the torch backend"):
        S.check_backend(load("--use_lora", "--lora_dropout=0.1"), "jax")


def test_routing_conflicts_and_detected_family():
    with pytest.raises(JaxboothError, match="no backend supports all options"):
        S.choose_backend(load("--use_8bit_adam", "--fsdp_parallelism=2"), GPU80)
    with pytest.raises(JaxboothError, match="torch backend, which does not run on TPU"):
        S.choose_backend(load("--use_8bit_adam"), TPU)
    # a detected family (the CLI read it from model_index.json) routes as the flag would, the reason naming its source
    assert S.choose_backend(load(), GPU80, model_family="deepfloyd_if", family_source="m/model_index.json names "
                            "IFPipeline (DeepFloyd IF stage I)") == (
        "torch", "backend auto -> torch: m/model_index.json names IFPipeline (DeepFloyd IF stage I), which only the "
                 "torch backend trains")
    assert S.choose_backend(load("--model_family=sd"), GPU80, model_family="deepfloyd_if")[0] == "jax"


def test_jax_supports_the_core_dreambooth_options():
    spec = load("--train_text_encoder", "--with_prior_preservation", "--class_data_dir=c", "--class_prompt=p",
                "--snr_gamma=5", "--offset_noise", "--gradient_checkpointing", "--mixed_precision=bf16",
                "--gradient_accumulation_steps=4", "--lr_scheduler=cosine_with_restarts",
                "--checkpointing_steps=50", "--resume_from_checkpoint=latest", "--validation_prompt=x",
                "--push_to_hub", "--dataloader_num_workers=4", "--tokenizer_max_length=77",
                "--text_encoder_use_attention_mask", "--backend=jax")
    assert unsupported_options(spec, "jax") == []


def test_capability_table_names_real_keys_and_values():
    for cap in CAPABILITIES:
        info = S.FIELDS[cap.key]
        assert cap.backends <= {"jax", "torch"} and (cap.backends or cap.note), cap  # empty: planned, with a note
        if info.choices:
            assert set(cap.values) <= set(info.choices), cap


def test_device_info_rejects_unknown_platform():
    with pytest.raises(ValueError):
        S.DeviceInfo("npu", None, 1)


# --------------------------------------------------------------------------- round trip and configs


def test_resolved_spec_round_trip(tmp_path):
    spec = load("--pretrained_model_name_or_path=m", "--instance_prompt=a photo of sks dog",
                "--learning_rate=5e-6", "--validation_prompt=v", "--validation_images", "a.png", "b.png",
                "--mixed_precision=bf16",
                "--max_train_steps=7", "--with_prior_preservation", "--class_data_dir=c", "--class_prompt=p",
                "--use_lora", "--lora_target_modules", "to_q", "to_v", "--seed=0", "--optimizer=AdamW")
    path = S.write_resolved_spec(spec, tmp_path / "sub" / "spec.yaml")
    assert load("--config", str(path)) == spec
    nested = yaml.safe_load(path.read_text())
    assert set(nested) == {"backend", *S.SECTIONS} and nested["optim"]["learning_rate"] == 5e-6


def test_resolved_spec_never_contains_the_hub_token(tmp_path):
    path = S.write_resolved_spec(load("--hub_token=hf_secret"), tmp_path / "spec.yaml")
    assert "hf_secret" not in path.read_text()
    assert S.spec_to_dict(load("--hub_token=hf_secret"))["hub"]["hub_token"] == "hf_secret"


@pytest.mark.parametrize("first", ["jaxbooth.capabilities", "jaxbooth.spec.schema", "jaxbooth.spec.loading",
                                   "jaxbooth.spec"])
def test_spec_and_capabilities_import_in_either_order(first):
    code = (f"import {first}; import jaxbooth.spec as s, jaxbooth.capabilities as c; "
            "assert s.check_backend is c.check_backend and s.DeviceInfo is c.DeviceInfo; "
            "s.load_spec(['--backend=jax', '--seed=1'])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_spec_module_imports_no_framework():
    code = ("import sys, jaxbooth.spec, jaxbooth.capabilities; "
            "bad = [m for m in ('jax', 'torch', 'flax', 'transformers', 'diffusers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seeds_outside_numpys_range_are_refused(seed):
    assert "--seed" in error_of(f"--seed={seed}")
    assert S.load_spec_from_dict({"seed": 2**32 - 1}).optim.seed == 2**32 - 1
