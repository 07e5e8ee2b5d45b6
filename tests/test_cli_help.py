"""`jaxbooth train|spec` command line: argparse from the FIELDS table, --help, script modes and the
checks that run before any model loads (LoRA mode, fp16 on JAX, piecewise_constant, missing packages).

Framework-free. The diffusers flag lists and defaults below were read once from the parse_args of
diffusers' train_dreambooth.py, train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py (main,
58eb52c) and train_dreambooth_flax.py (v0.39.0), and are committed here so no test needs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jaxbooth import cli, preflight, run_defaults
from jaxbooth import spec as S
from jaxbooth.capabilities import backend_support
from jaxbooth.errors import JaxboothError
from tests._diffusers_scripts import SCRIPT_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
GB = 10**9

LORA_SCRIPTS = ("train_dreambooth_lora.py", "train_dreambooth_lora_sdxl.py")


def load(*args: str) -> S.RunSpec:
    return S.load_spec(list(args))


def error_of(*args: str) -> str:
    with pytest.raises(JaxboothError) as info:
        load(*args)
    return str(info.value)


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """cli.main's exit status, stdout and stderr; argparse's own exit (generate, tiny-model) counts too."""
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def help_blocks(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(option name -> its help entry with whitespace collapsed, option name -> its group title)."""
    blocks: dict[str, list[str]] = {}
    groups: dict[str, str] = {}
    group = current = None
    for line in text.splitlines():
        header = re.fullmatch(r"(\w+):", line)
        option = re.match(r"  (?:-h, )?--(\w+)", line)
        if header:
            group, current = header.group(1), None
        elif option:
            current = option.group(1)
            blocks[current], groups[current] = [line], group
        elif current and line.strip():
            blocks[current].append(line)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in blocks.items()}, groups


@pytest.fixture(autouse=True)
def fixed_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help to the terminal width; pin it so the output is the same everywhere."""
    monkeypatch.setenv("COLUMNS", "100")


@pytest.fixture
def train_help() -> str:
    return S.format_help("jaxbooth train")


# --------------------------------------------------------------------------- --help


def test_train_help_exits_0_and_lists_every_flag_of_the_four_scripts(capsys):
    status, out, err = run_main(["train", "--help"], capsys)
    assert status == 0 and err == ""
    listed = help_blocks(out)[0]
    flags = {flag for defaults in SCRIPT_DEFAULTS.values() for flag in defaults}
    assert sorted(flags - set(listed)) == []
    assert set(S.FIELDS) <= set(listed)
    assert run_main(["train", "-h"], capsys)[1] == out


def test_help_groups_every_key_by_section_under_its_docstring(train_help):
    _, groups = help_blocks(train_help)
    for name, info in S.FIELDS.items():
        assert groups[name] == (info.section or "general"), name
    for section, cls in S.SECTIONS.items():
        heading = re.search(rf"^{section}:\n(.*?)\n  --", train_help, flags=re.M | re.S)
        assert heading and " ".join(heading.group(1).split()) == " ".join(cls.__doc__.split()), section


@pytest.mark.parametrize("flag, fragments", [
    ("learning_rate", ["Peak learning rate", "Default: 5e-06.", "Backends: jax, torch."]),
    ("use_8bit_adam", ["bitsandbytes", "Default: false.", "Backends: torch only."]),
    ("mixed_precision", ["--mixed_precision {no,fp16,bf16}", "Backends: jax, torch; fp16: torch only."]),
    ("optimizer", ["prodigy: torch only", "adafactor, lion: jax only"]),
    ("fsdp_parallelism", ["Backends: jax only."]),
    ("validation_images", ["--validation_images VALUE [VALUE ...]"]),
    ("center_crop", ["--center_crop [true|false]"]),
    ("lr_scheduler", ["Default: constant."]),
    ("config", ["Repeatable"]),
])
def test_help_entry_has_description_default_and_backends(train_help, flag, fragments):
    entry = help_blocks(train_help)[0][flag]
    for fragment in fragments:
        assert fragment in entry, (fragment, entry)


def test_backend_support_text_comes_from_the_capability_table():
    assert backend_support("seed") == "jax, torch"
    assert backend_support("use_lora") == "jax, torch"
    assert backend_support("lora_dropout") == "torch only"
    assert backend_support("model_family") == "jax, torch; deepfloyd_if: torch only"
    assert backend_support("class_labels_conditioning") == "torch only"
    assert backend_support("mixed_precision") == "jax, torch; fp16: torch only"
    assert backend_support("cache_latents") == "jax, torch; false: torch only"


def test_help_after_a_script_shows_that_scripts_defaults(capsys):
    status, out, _ = run_main(["train", "examples/dreambooth/train_dreambooth_lora.py", "--help"], capsys)
    blocks = help_blocks(out)[0]
    assert status == 0 and "Defaults below are those of train_dreambooth_lora.py" in out
    assert "Default: 0.0005." in blocks["learning_rate"] and "Default: true." in blocks["use_lora"]
    assert "Default: lanczos." in blocks["image_interpolation_mode"]


@pytest.mark.parametrize("command, usage", [
    ([], "usage: jaxbooth <command>"),
    (["train"], "usage: jaxbooth train [SCRIPT.py]"),
    (["spec"], "usage: jaxbooth spec [SCRIPT.py]"),
    (["generate"], "usage: jaxbooth generate"),
    (["tiny-model"], "usage: jaxbooth tiny-model"),
])
def test_every_command_has_help(capsys, command, usage):
    status, out, err = run_main([*command, "--help"], capsys)
    assert status == 0 and out.startswith(usage) and err == ""


def test_help_through_the_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "jaxbooth", "spec", "--help"], capture_output=True,
                            text=True, env=env, cwd=REPO)
    assert result.returncode == 0 and "--pretrained_model_name_or_path" in result.stdout
    assert result.stderr == ""


# --------------------------------------------------------------------------- flag syntax


def test_bool_flags_bare_and_with_a_value():
    assert load("--center_crop").data.center_crop is True
    assert load("--center_crop", "false").data.center_crop is False
    assert load("--center_crop=False", "--random_flip", "true").data.random_flip is True
    assert load("--center_crop", "--seed", "3").optim.seed == 3  # a bare flag does not eat the next option
    assert "--center_crop='dog' is not true or false" in error_of("--center_crop", "dog")


def test_list_keys_take_several_values():
    spec = load("--validation_images", "a.png", "b.png", "--seed", "1", "--use_lora",
                "--lora_target_modules", "to_q", "to_v")
    assert spec.validation.validation_images == ("a.png", "b.png") and spec.optim.seed == 1
    assert spec.lora.lora_target_modules == ("to_q", "to_v")
    assert "--validation_images needs one or more values" in error_of("--validation_images")


def test_dashes_work_in_names():
    spec = load("--learning-rate", "1e-4", "--train-batch-size=2", "--with-prior-preservation",
                "--class-data-dir=c", "--class_prompt=p")
    assert (spec.optim.learning_rate, spec.optim.train_batch_size) == (1e-4, 2)
    assert spec.prior.with_prior_preservation and spec.prior.class_data_dir == "c"


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat=1e-5"], "--learning_rat: unknown option; did you mean --learning_rate (section optim)?"),
    (["--learning-rat", "1e-5"], "--learning_rat: unknown option; did you mean --learning_rate (section optim)?"),
    (["--learning=1e-4"], "--learning: unknown option"),  # no argparse abbreviations
])
def test_unknown_flags_name_the_closest_key(argv, message):
    assert error_of(*argv).startswith(message)


def test_unknown_flags_are_one_error_without_a_usage_dump(capsys):
    status, out, err = run_main(["train", "--learning_rat=1e-5", "--resolutoin=64"], capsys)
    assert status == 2 and out == "" and "usage" not in err
    assert err.startswith("jaxbooth train: error: unknown options:")
    assert "did you mean --learning_rate (section optim)?" in err and "did you mean --resolution" in err


def test_configs_are_repeatable_and_flags_win(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("optim:\n  seed: 1\n  train_batch_size: 8\n")
    second.write_text("seed: 2\n")
    spec = load("--config", str(first), f"--config={second}", "--train-batch-size", "3")
    assert (spec.optim.seed, spec.optim.train_batch_size) == (2, 3)


def test_config_errors_cite_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\noptim:\n  learning_rat: 1.0e-5\n")
    assert f"{path}:3: optim.learning_rat: unknown key; did you mean --learning_rate" in error_of("--config", str(path))


def test_one_parse_gives_the_spec_and_the_given_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  resolution: 256\n")
    argv = ["train_dreambooth_lora.py", "--config", str(config), "--seed=4"]
    spec, given = S.load_spec_with_keys(argv)
    assert spec == S.load_spec(argv) and given == S.given_keys(argv)
    assert {"resolution", "seed", "use_lora", "learning_rate"} <= given and "train_batch_size" not in given


# --------------------------------------------------------------------------- script modes


@pytest.mark.parametrize("script", list(SCRIPT_DEFAULTS))
def test_script_mode_reproduces_every_default_of_that_script(script):
    flat = load(f"examples/dreambooth/{script}").flat()
    wrong = {}
    for flag, default in SCRIPT_DEFAULTS[script].items():
        ours = flat[flag]
        same = ours.lower() == default.lower() if isinstance(default, str) and ours else ours == default
        if not same:
            wrong[flag] = (ours, default)
    assert wrong == {}
    assert flat["use_lora"] is (script in LORA_SCRIPTS)


def test_diffusers_flag_kinds_match():
    for defaults in SCRIPT_DEFAULTS.values():
        for flag, default in defaults.items():
            if isinstance(default, bool):  # store_true, or type=bool for the prodigy flags
                assert S.FIELDS[flag].kind == "bool", flag
    assert S.FIELDS["validation_images"].kind == "list"  # nargs="+"


def test_script_name_forms_and_flags_win():
    assert load("train_dreambooth_lora").lora.use_lora
    assert load("train_dreambooth_lora_sdxl.py", "--resolution=768").data.resolution == 768
    assert load("train_dreambooth_lora.py", "--preset=train_dreambooth_lora.py").lora.use_lora
    assert "disagree" in error_of("train_dreambooth_lora.py", "--preset=train_dreambooth.py")


def test_unknown_script_lists_the_known_ones(capsys):
    message = error_of("train_dreambooth_lora2.py", "--seed=1")
    assert message.startswith("unknown script 'train_dreambooth_lora2.py'")
    assert all(script in message for script in SCRIPT_DEFAULTS)
    status, _, err = run_main(["spec", "my_script.py"], capsys)
    assert status == 2 and "unknown script 'my_script.py';" in err  # nothing close: no suggestion
    assert "did you mean train_dreambooth_lora_sdxl.py?" in error_of("train_dreambooth_sdxl.py")


def test_spec_command_prints_the_scripts_resolved_spec(capsys):
    status, out, _ = run_main(["spec", "train_dreambooth_lora.py", "--rank=8"], capsys)
    assert status == 0 and "use_lora: true" in out and "rank: 8" in out and "learning_rate: 0.0005" in out


@pytest.mark.parametrize("flag", [
    "--rank=8", "--lora_alpha=8", "--lora_dropout=0.1", "--use_dora", "--lora_target_modules=to_q",
    "--lora_text_encoder_target_modules=q_proj", "--output_kohya_format",
])
def test_lora_only_flag_without_lora_mode_is_an_error(flag):
    message = error_of(flag)
    assert message.startswith(flag.split("=")[0]) and "LoRA mode is off" in message
    assert "use `jaxbooth train train_dreambooth_lora.py ...` or --use_lora" in message
    assert load("train_dreambooth_lora.py", flag).lora.use_lora
    assert load("--use_lora", flag).lora.use_lora


def test_lora_only_flags_are_listed_together():
    assert {"rank", "use_dora", "output_kohya_format"} <= set(S.LORA_ONLY_KEYS)
    message = error_of("--rank=8", "--use_dora")
    assert message.startswith("--rank=8, --use_dora=True are LoRA options, but")


# --------------------------------------------------------------------------- refused before loading


def test_fp16_is_refused_on_jax_with_the_bf16_fix():
    message = error_of("--backend=jax", "--mixed_precision=fp16")
    assert "--mixed_precision=fp16 is only supported by the torch backend" in message
    assert "--mixed_precision=bf16" in message and "loss scaling" in message
    assert load("--backend=jax", "--mixed_precision=bf16").precision.mixed_precision == "bf16"
    assert load("--backend=torch", "--mixed_precision=fp16").precision.mixed_precision == "fp16"


def test_fp16_routes_auto_to_torch_and_fails_on_tpu_naming_bf16():
    spec = load("--mixed_precision=fp16")
    assert S.choose_backend(spec, S.DeviceInfo("gpu", 80 * GB, 1))[0] == "torch"
    with pytest.raises(JaxboothError, match=r"does not run on TPU; use --mixed_precision=bf16"):
        S.choose_backend(spec, S.DeviceInfo("tpu", 16 * GB, 8))


def test_piecewise_constant_is_refused_naming_the_working_schedules():
    message = error_of("--lr_scheduler=piecewise_constant")
    assert message.startswith("--lr_scheduler=piecewise_constant: needs step rules")
    assert "use one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup" in message
    for schedule in ("linear", "cosine_with_restarts", "constant_with_warmup"):
        assert load(f"--lr_scheduler={schedule}").optim.lr_scheduler == schedule


# --------------------------------------------------------------------------- missing packages


@dataclass
class FakeFindSpec:
    """Stands in for importlib.util.find_spec: ``absent`` modules are not found; ``asked`` records calls."""

    absent: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)

    def __call__(self, name: str, package: str | None = None) -> object | None:
        self.asked.append(name)
        return None if name in self.absent else object()


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> FakeFindSpec:
    fake = FakeFindSpec()
    monkeypatch.setattr(preflight.importlib.util, "find_spec", fake)
    return fake


def packages_error(spec: S.RunSpec, backend: str) -> str:
    with pytest.raises(JaxboothError) as info:
        preflight.check_packages(spec, backend)
    return str(info.value)


def test_check_packages_names_each_missing_package_with_its_pip_command(missing):
    missing.absent.update({"wandb", "datasets", "bitsandbytes"})
    spec = load("--report_to=wandb", "--dataset_name=user/dogs", "--use_8bit_adam")
    message = packages_error(spec, "torch")
    assert message.startswith("3 packages this run needs are missing (pip install wandb datasets bitsandbytes)")
    assert "--report_to=wandb needs the wandb package: pip install wandb" in message
    assert "--dataset_name=user/dogs needs the datasets package: pip install datasets" in message
    assert "--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes" in message
    assert packages_error(spec, "jax").startswith("2 packages")  # bitsandbytes is a torch matter


@pytest.mark.parametrize("argv, module", [
    (["--report_to=all"], "wandb"),
    (["--optimizer=prodigy"], "prodigyopt"),
    (["--enable_xformers_memory_efficient_attention"], "xformers"),
    (["--report_to=mlflow"], "mlflow"),
    (["--report_to=comet_ml"], "comet_ml"),
])
def test_check_packages_on_torch(missing, argv, module):
    spec = load(*argv)
    preflight.check_packages(spec, "torch")
    missing.absent.add(module)
    assert f"pip install {module}" in packages_error(spec, "torch")


def test_tensorboard_is_checked_on_torch_only(missing):
    spec = load()  # report_to defaults to tensorboard
    missing.absent.update({"tensorboard", "tensorboardX"})
    preflight.check_packages(spec, "jax")  # jaxbooth writes event files itself
    assert "--report_to=tensorboard needs the tensorboard package" in packages_error(spec, "torch")
    missing.absent.discard("tensorboardX")  # accelerate takes either writer
    preflight.check_packages(spec, "torch")


def test_check_packages_only_asks_find_spec(missing, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)  # another test in this process may have imported it
    preflight.check_packages(load("--report_to=wandb"), "jax")
    assert missing.asked == ["wandb"]
    assert "wandb" not in sys.modules


def test_train_checks_packages_after_choosing_the_backend_and_before_loading(missing, monkeypatch, capsys):
    missing.absent.add("wandb")

    def must_not_run(*args, **kwargs):
        raise AssertionError("fill_defaults ran before the package check")

    monkeypatch.setattr(run_defaults, "fill_defaults", must_not_run)
    status, _, err = run_main(["train", "--backend=jax", "--report_to=wandb"], capsys)
    assert status == 2 and "pip install wandb" in err
