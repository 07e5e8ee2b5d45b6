"""docs/from_diffusers.md: every command line of diffusers' DreamBooth guide beside its jaxbooth equivalent.

The guide's training commands are tests/test_spec.py's GUIDE_COMMANDS (checked there against the guide). Each has
an entry on the page: the guide's block verbatim, then the jaxbooth block (marked ``<!-- entry: NAME -->``), which
must load to the guide command's run spec; the backend the page names is the one ``--backend=auto`` picks. Every
jaxbooth block runs on a tiny model: the full PyTorch and Flax commands and the PyTorch inference code here (1 step,
64 px, the Hub faked), the rest in the tests REFERENCES names, which already run them (checked: each test exists, and
it and what it uses hold the command's distinctive flags, with the values the page gives them).
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jaxbooth import spec as S
from jaxbooth.errors import JaxboothError
from tests.test_spec import GUIDE, GUIDE_COMMANDS, VALIDATION_SNIPPET, jaxbooth_argv

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "from_diffusers.md"
BLOCK = re.compile(r"(?:<!-- entry: (?P<entry>\w+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
SCRIPT = re.compile(r"train_dreambooth\w*\.py")
# Entries whose jaxbooth block is a training command: the guide's, plus the 8 GB recipe and the LoRA and SDXL
# sections (the guide gives no command there).
TRAINING = (*GUIDE_COMMANDS, "8GB", "lora", "sdxl")
RUN_HERE = ("pytorch", "flax", "infer_pytorch")


@dataclass(frozen=True)
class Block:
    entry: str | None
    lang: str
    body: str
    after: str  # the page's text from this block to the next heading


def page_blocks() -> list[Block]:
    text = PAGE.read_text(encoding="utf-8")
    matches = list(BLOCK.finditer(text))
    blocks = []
    for match in matches:
        rest = text[match.end():]
        heading = re.search(r"^#", rest, flags=re.M)
        blocks.append(Block(match["entry"], match["lang"], match["body"], rest[:heading.start()] if heading else rest))
    return blocks


BLOCKS = page_blocks()
ENTRIES = {block.entry: i for i, block in enumerate(BLOCKS) if block.entry}


def entry(name: str) -> Block:
    return BLOCKS[ENTRIES[name]]


def argv_of(command: str) -> list[str]:
    """What follows `jaxbooth train`: the script name, then tests/test_spec.py's jaxbooth_argv of the command."""
    return [SCRIPT.search(command).group(0), *jaxbooth_argv(command)]


def spec_of(command: str) -> S.RunSpec:
    return S.load_spec(argv_of(command))


# --------------------------------------------------------------------------- the page's entries


def test_entries_are_unique_and_each_is_run_here_or_referenced():
    named = [block.entry for block in BLOCKS if block.entry]
    assert len(named) == len(set(named))
    assert set(named) == set(RUN_HERE) | set(REFERENCES) and not set(RUN_HERE) & set(REFERENCES)
    assert set(TRAINING) | {"validation"} <= set(named)


@pytest.mark.parametrize("name", list(GUIDE_COMMANDS))
def test_each_guide_command_is_on_the_page_beside_its_jaxbooth_command(name):
    guide, ours = BLOCKS[ENTRIES[name] - 1], entry(name)
    assert guide.entry is None and guide.body.strip() == GUIDE_COMMANDS[name].strip()
    assert ours.body.startswith("jaxbooth train train_dreambooth")
    assert spec_of(ours.body) == spec_of(GUIDE_COMMANDS[name])


def test_no_other_guide_command_on_the_page():
    launches = [block.body.strip() for block in BLOCKS
                if re.match(r"(accelerate launch|python) train_dreambooth", block.body)]
    assert sorted(launches) == sorted(command.strip() for command in GUIDE_COMMANDS.values())


def test_the_8gb_recipe_is_the_guides_pytorch_command_under_the_deepspeed_config():
    assert BLOCKS[ENTRIES["8GB"] - 1].body.strip() == "accelerate config"
    command = entry("8GB").body
    config = re.search(r"--config_file (\S+) -m jaxbooth train ", command)
    assert config and (REPO / config.group(1)).is_file()
    assert spec_of(command) == S.replace_flat(spec_of(GUIDE_COMMANDS["pytorch"]), backend="torch")


def test_the_validation_flags_go_unchanged_onto_any_command():
    assert BLOCKS[ENTRIES["validation"] - 1].body.strip() == VALIDATION_SNIPPET == entry("validation").body.strip()
    argv = argv_of(GUIDE_COMMANDS["pytorch"]) + shlex.split(entry("validation").body)
    assert S.validation_schedule(S.load_spec(argv)) == ("steps", 100)


def test_the_lora_and_sdxl_commands_select_their_scripts_modes():
    lora, sdxl = spec_of(entry("lora").body), spec_of(entry("sdxl").body)
    assert lora.lora.use_lora and lora.model.model_family == "auto"
    assert sdxl.lora.use_lora and sdxl.model.model_family == "sdxl"


TPU = S.DeviceInfo("tpu", 16 * 2**30, 8)
CPU = S.DeviceInfo("cpu", None, 1)
GPU80 = S.DeviceInfo("gpu", 80 * 10**9, 1)
GPU16 = S.DeviceInfo("gpu", 16 * 10**9, 1)


@pytest.mark.parametrize("name", TRAINING)
def test_the_backend_the_page_names_is_the_one_auto_picks(name):
    said = re.search(r"^Backend: (auto|torch)\b", entry(name).after, flags=re.M)
    assert said, f"{name}: no 'Backend: auto|torch' line after the command"
    spec = spec_of(entry(name).body)
    family = {"model_family": "deepfloyd_if", "family_source": "model_index.json names IFPipeline"} \
        if name.startswith("if_") else {}
    picks = [S.choose_backend(spec, device, **family)[0] for device in (CPU, GPU16, GPU80)]
    if said.group(1) == "auto":
        assert picks == ["jax", "torch", "jax"]
        assert S.choose_backend(spec, TPU, **family)[0] == "jax"
    else:
        assert picks == ["torch"] * 3
        with pytest.raises(JaxboothError, match="does not run on TPU"):
            S.choose_backend(spec, TPU, **family)


# --------------------------------------------------------------------------- run here: PyTorch and Flax commands


def substitute(argv: list[str], **values: object) -> list[str]:
    """``argv`` with each named flag set to the given value (in place where present, else appended)."""
    out, seen = [], set()
    for token in argv:
        key = token[2:].partition("=")[0] if token.startswith("--") else None
        if key in values:
            token, seen = f"--{key}={values[key]}", seen | {key}
        out.append(token)
    return out + [f"--{key}={value}" for key, value in values.items() if key not in seen]


def runnable(command: str, model: Path, out: Path) -> list[str]:
    """The page's command on the tiny model and the bundled images, at 64 px for 1 step, into ``out``."""
    from jaxbooth.data import example_instance_dir

    return substitute(argv_of(command), pretrained_model_name_or_path=model, instance_data_dir=example_instance_dir(),
                      output_dir=out, resolution=64, max_train_steps=1)


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """The page's PyTorch and Flax commands through the CLI (backend auto: JAX on this CPU), --push_to_hub to a
    recorded stand-in for huggingface_hub's create_repo/upload_folder."""
    from jaxbooth.cli import main
    from tests.torch_backend._deepfloyd_seed import fake_hub

    root, done = tmp_path_factory.mktemp("from-diffusers"), {}
    for name in ("pytorch", "flax"):
        argv = runnable(entry(name).body, tiny_model_dir, root / name)
        with fake_hub() as uploads:
            assert main(["train", *argv]) == 0
        done[name] = SimpleNamespace(out=root / name, argv=argv, uploads=uploads)
    return done


@pytest.mark.parametrize("name", ["pytorch", "flax"])
def test_the_full_fine_tune_commands_run_and_push(runs, name):
    run = runs[name]
    assert run.uploads == [(name, run.out)]  # repo named after the output folder, as diffusers
    assert (run.out / "model_index.json").is_file() and (run.out / "unet" / "config.json").is_file()
    assert "(jax backend)" in (run.out / "README.md").read_text()
    resolved = S.load_spec(["--config", str(run.out / "jaxbooth_run.yaml")])
    given = S.load_spec(run.argv)
    assert given.optim.seed == (0 if name == "flax" else None)  # the Flax script's default seed
    assert S.replace_flat(resolved, seed=given.optim.seed) == given  # the file records the seed a run drew
    assert resolved.optim.seed is not None
    records = [yaml.safe_load(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["train/lr"] == pytest.approx(5e-6)


GUIDE_PYTORCH_INFERENCE = (
    "from diffusers import DiffusionPipeline\n"
    "import torch\n"
    "\n"
    'pipeline = DiffusionPipeline.from_pretrained("path_to_saved_model", torch_dtype=torch.float16, '
    'use_safetensors=True).to("cuda")\n'
    'image = pipeline("A photo of sks dog in a bucket", num_inference_steps=50, guidance_scale=7.5).images[0]\n'
    'image.save("dog-bucket.png")\n')


@pytest.mark.skipif(not GUIDE.exists(), reason="the seed guide is not in this checkout")
def test_the_pytorch_inference_code_is_the_guides():
    assert GUIDE_PYTORCH_INFERENCE in GUIDE.read_text(encoding="utf-8")


def test_the_guides_pytorch_inference_code_runs_on_a_jaxbooth_output(runs, tmp_path, monkeypatch):
    """As written, but for CPU: float32, "cpu", and 2 denoising steps instead of 50."""
    pytest.importorskip("torch")
    from PIL import Image

    code = entry("infer_pytorch").body
    assert code == GUIDE_PYTORCH_INFERENCE
    for old, new in [("path_to_saved_model", str(runs["pytorch"].out)), ("torch.float16", "torch.float32"),
                     ('.to("cuda")', '.to("cpu")'), ("num_inference_steps=50", "num_inference_steps=2")]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "from_diffusers.md", "exec"), {})
    with Image.open(tmp_path / "dog-bucket.png") as image:
        assert image.size == (64, 64)


# --------------------------------------------------------------------------- run elsewhere: the references


@dataclass(frozen=True)
class Ref:
    """A test that already runs an entry's command: ``holds`` must be in its source or what it uses from its
    module (fixtures it takes, module-level names it reads); a ``--flag=value`` there must also be on the page's
    command with the same value."""

    path: str
    test: str
    holds: tuple[str, ...]


JAX_TRAIN, TORCH_FEATURES = "tests/jax_backend/test_train.py", "tests/torch_backend/test_features.py"
JAX_PRIOR = "test_prior_preservation_text_encoder_training_and_validation"
TORCH_PRIOR = "test_prior_preservation_generates_missing_class_images_and_trains_text_encoder"
MEMORY, STAGE1, STAGE2 = ("tests/torch_backend/test_memory.py", "tests/torch_backend/test_deepfloyd_stage1.py",
                          "tests/torch_backend/test_deepfloyd_stage2.py")
FLAX_PIPELINE = "tests/jax_backend/test_flax_pipeline.py"
STAGE1_LORA_TEST = "test_seed_stage1_lora_loads_with_load_lora_weights_and_generates"
STAGE2_TEST = "test_seed_stage2_full_and_lora_outputs_load_and_upscale"
VALIDATION_FLAGS = ("--validation_prompt=", "--num_validation_images=", "--validation_steps=")

REFERENCES: dict[str, tuple[Ref, ...]] = {
    "bf16": (Ref(JAX_TRAIN, JAX_PRIOR, ("--mixed_precision=bf16",)),
             Ref(TORCH_FEATURES, "test_bf16_accumulation_scaled_lr_and_cosine_warmup", ("--mixed_precision=bf16",))),
    "min_snr": (Ref(JAX_TRAIN, JAX_PRIOR, ("--snr_gamma=5.0",)),
                Ref(TORCH_FEATURES, TORCH_PRIOR, ("--snr_gamma=5.0",))),
    "prior": (Ref(JAX_TRAIN, JAX_PRIOR, ("--with_prior_preservation", "--class_data_dir=", "--class_prompt=")),
              Ref(TORCH_FEATURES, TORCH_PRIOR, ("--with_prior_preservation", "--class_data_dir=", "--class_prompt="))),
    "text_encoder": (Ref(JAX_TRAIN, JAX_PRIOR, ("--train_text_encoder",)),
                     Ref(TORCH_FEATURES, TORCH_PRIOR, ("--train_text_encoder",))),
    "validation": (Ref(JAX_TRAIN, JAX_PRIOR, VALIDATION_FLAGS),
                   Ref(TORCH_FEATURES, "test_precomputed_embeddings_attention_mask_and_validation_images",
                       VALIDATION_FLAGS)),
    "16GB": (Ref(MEMORY, "test_16gb_recipe_gradient_checkpointing_and_8bit_adam",
                 ("--gradient_checkpointing", "--use_8bit_adam")),),
    "12GB": (Ref(MEMORY, "test_12gb_recipe_without_xformers_sets_grads_to_none",
                 ("--use_8bit_adam", "--gradient_checkpointing", "--set_grads_to_none")),
             Ref(MEMORY, "test_xformers_where_it_cannot_run_is_refused_before_models_load",
                 ("--enable_xformers_memory_efficient_attention",)),
             Ref(MEMORY, "test_xformers_kernels_train_on_gpu", ("--enable_xformers_memory_efficient_attention",))),
    "8GB": (Ref(MEMORY, "test_8gb_recipe_deepspeed_zero2_cpu_offload",
                ("accelerate_deepspeed_zero2_offload.yaml", '"-m", "jaxbooth", "train", "--backend=torch"')),),
    "lora": (Ref("tests/test_lora_cli.py", "test_dreambooth_lora",
                 ('"train_dreambooth_lora.py"', "--train_batch_size=1",
                  "--gradient_accumulation_steps=1", "--learning_rate=5.0e-04", "--scale_lr", "--lr_scheduler=constant",
                  "--lr_warmup_steps=0")),),
    "sdxl": (Ref("tests/jax_backend/test_sdxl_train.py", "test_lora_run_loads_in_stock_diffusers_with_the_jax_output",
                 ('"train_dreambooth_lora_sdxl.py"', "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0")),
             Ref("tests/torch_backend/test_sdxl.py", "test_lora_loads_into_stock_sdxl_and_equals_the_trained_peft_unet",
                 ('"train_dreambooth_lora_sdxl.py"', "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0"))),
    "if_stage1_lora": (Ref(STAGE1, STAGE1_LORA_TEST, ("seed_argv(STAGE1_LORA",)),),
    "if_stage2_lora": (Ref(STAGE2, STAGE2_TEST, ("(\"lora\", STAGE2_LORA", "seed_argv(command")),),
    "if_stage1_full": (Ref(STAGE1, "test_seed_stage1_full_output_is_an_ifpipeline_without_text_encoder",
                           ("seed_argv(STAGE1_FULL",)),),
    "if_stage2_full": (Ref(STAGE2, STAGE2_TEST, ("(\"full\", STAGE2_FULL", "seed_argv(command")),),
    "infer_checkpoint": (Ref(JAX_TRAIN, "test_checkpoint_unet_and_final_pipeline_load_in_diffusers",
                             ('subfolder="checkpoint-2/unet"',)),
                         Ref(TORCH_FEATURES, TORCH_PRIOR, ('"checkpoint-2" / "text_encoder"',))),
    "generate": (Ref(FLAX_PIPELINE, "test_the_plain_path_gives_jaxbooth_generates_images_for_the_same_seed",
                     ('["generate", str(trained)', '"--guidance", "7.5"')),),
    "infer_flax": (Ref(FLAX_PIPELINE, "test_the_guides_flax_code_runs_on_a_train_output",
                       ('("from diffusers import", "from jaxbooth import")',)),),
    "infer_if_lora": (Ref(STAGE1, STAGE1_LORA_TEST, ("pipe.load_lora_weights(out)", 'variance_type="fixed_small"')),
                      Ref("tests/torch_backend/test_deepfloyd_sampling.py",
                          "test_generate_if_full_and_lora_with_fixed_variance",
                          ('["generate", str(model)', "lora_dir"))),
}
# The IF tests run tests/torch_backend/_deepfloyd_seed.py's copies of the guide's commands.
SEED_COPIES = {"if_stage1_lora": "STAGE1_LORA", "if_stage2_lora": "STAGE2_LORA", "if_stage1_full": "STAGE1_FULL",
               "if_stage2_full": "STAGE2_FULL"}


def used_source(path: Path, test: str) -> str:
    """The test's source, and that of every module-level definition it reaches by name or takes as a fixture."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs[name.id] = node
    assert test in defs and isinstance(defs[test], ast.FunctionDef), f"{path.name} has no test {test}"
    seen, todo, parts = set(), [test], []
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        node = defs[name]
        parts.append(ast.get_source_segment(text, node))
        todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
        if isinstance(node, ast.FunctionDef):
            todo += [arg.arg for arg in node.args.args]  # fixtures it takes
    return "\n".join(parts)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_the_referenced_tests_run_the_pages_command(name):
    page = entry(name).body
    for ref in REFERENCES[name]:
        source = used_source(REPO / ref.path, ref.test)
        for hold in ref.holds:
            assert hold in source, f"{ref.path}::{ref.test} does not hold {hold}"
            if re.fullmatch(r"--\w+(=\S+)?", hold):
                key, _, value = hold[2:].partition("=")
                assert f"--{key}" in page, f"the page's {name} command lacks --{key}"
                if value:
                    assert S.get_flat(spec_of(page), key) == S.get_flat(S.load_spec([hold]), key), hold
            elif SCRIPT.fullmatch(hold.strip('"')):
                assert page.startswith(f"jaxbooth train {hold.strip(chr(34))}"), hold


@pytest.mark.parametrize("name", list(SEED_COPIES))
def test_the_if_tests_run_the_guides_commands(name):
    """tests/torch_backend/_deepfloyd_seed.py's commands, which the IF tests run, are the guide's."""
    tree = ast.parse((REPO / "tests" / "torch_backend" / "_deepfloyd_seed.py").read_text(encoding="utf-8"))
    copies = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in SEED_COPIES.values()}
    assert argv_of(copies[SEED_COPIES[name]]) == argv_of(GUIDE_COMMANDS[name]) == argv_of(entry(name).body)


def test_the_gpu_only_reference_is_marked_as_the_gpu_tests_are():
    text = (REPO / MEMORY).read_text(encoding="utf-8")
    assert re.search(r"@pytest\.mark\.gpu\s+def test_xformers_kernels_train_on_gpu\(", text)
