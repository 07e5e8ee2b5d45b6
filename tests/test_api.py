"""`jaxbooth.train(...)` and the public surface: one real run from keyword arguments, the other input forms
resolving to the spec the command line gives, errors as JaxboothError (never SystemExit), the result of
resumed and stopped runs, and `import jaxbooth` loading no framework."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import jaxbooth
from jaxbooth import api, cli
from jaxbooth.checkpoints import TrainingStopped
from jaxbooth.data import example_instance_dir
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec, load_spec_with_keys

TINY = {"backend": "jax", "resolution": 64, "train_batch_size": 1, "learning_rate": 1e-4, "lr_warmup_steps": 0,
        "seed": 0, "report_to": "none", "log_every_steps": 1}
STAND_IN = {**TINY, "pretrained_model_name_or_path": "never-loaded"}  # for runs whose trainer is a stand-in


def flags(keys: dict) -> list[str]:
    """The command line of the same keys (list values as several tokens)."""
    argv = []
    for name, value in keys.items():
        argv += [f"--{name}", *map(str, value)] if isinstance(value, list) else [f"--{name}={value}"]
    return argv


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> api.TrainResult:
    out = tmp_path_factory.mktemp("api") / "out"
    return jaxbooth.train(pretrained_model_name_or_path=tiny_model_dir, instance_data_dir=example_instance_dir(),
                          instance_prompt="a photo of sks toy", output_dir=out, max_train_steps=2,
                          checkpointing_steps=2, **TINY)


def test_keyword_run_returns_the_output_steps_and_last_metrics(trained: api.TrainResult) -> None:
    assert isinstance(trained, jaxbooth.TrainResult) and trained.backend == "jax" and trained.steps == 2
    assert trained.output_dir.is_absolute() and (trained.output_dir / "model_index.json").is_file()
    records = [json.loads(line) for line in (trained.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert trained.metrics == {k: v for k, v in records[-1].items() if k not in ("step", "time")}
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/steps_per_sec"} <= trained.metrics.keys()
    with pytest.raises(AttributeError):
        trained.steps = 3  # frozen


def test_a_resumed_run_with_no_step_left_reports_the_checkpoint_and_its_metrics(trained: api.TrainResult,
                                                                               monkeypatch) -> None:
    """Nothing is logged by a run resumed at its last step; the result is the checkpoint's step and the
    record logged there, not a record of some other run."""
    ran = stand_in_trainer(monkeypatch)
    again = jaxbooth.train(pretrained_model_name_or_path=trained.output_dir, output_dir=trained.output_dir,
                           instance_prompt="a photo of sks toy", max_train_steps=2, resume_from_checkpoint="latest",
                           **TINY)
    assert len(ran) == 1 and (again.steps, again.metrics) == (2, trained.metrics)


def test_steps_and_metrics_come_from_this_run_only(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 400, "time": 1.0, "train/loss": 0.5}) + "\n")
    stand_in_trainer(monkeypatch)  # a fresh run into a used folder that logs nothing: no step of its own
    result = jaxbooth.train(output_dir=out, max_train_steps=3, **STAND_IN)
    assert (result.steps, result.metrics) == (0, {})
    stand_in_trainer(monkeypatch, log=[(3, {"train/loss": 0.25})])  # ... and one that logs, torn last line
    result = jaxbooth.train(output_dir=out, max_train_steps=3, **STAND_IN)
    assert (result.steps, result.metrics) == (3, {"train/loss": 0.25})


def test_a_signal_stop_is_an_error_naming_the_resume(tmp_path: Path, monkeypatch) -> None:
    def stopped(spec):
        raise TrainingStopped(2)

    monkeypatch.setitem(sys.modules, "jaxbooth.jax_backend.train", types.SimpleNamespace(train=stopped))
    with pytest.raises(JaxboothError, match="resume_from_checkpoint='latest'"):
        jaxbooth.train(output_dir=tmp_path / "out", max_train_steps=3, **STAND_IN)


def stand_in_trainer(monkeypatch: pytest.MonkeyPatch, log: list | None = None) -> list:
    """The JAX backend's train() replaced (no jax import); it appends ``log``'s records to metrics.jsonl,
    then half a line, as a killed writer would."""
    ran = []

    def train(spec):
        ran.append(spec)
        out = Path(spec.checkpointing.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "metrics.jsonl").open("a") as handle:
            for step, record in log or ():
                handle.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
            if log:
                handle.write('{"step": 4, "train/lo')
        return out

    monkeypatch.setitem(sys.modules, "jaxbooth.jax_backend.train", types.SimpleNamespace(train=train))
    return ran


def test_runspec_yaml_and_keywords_resolve_as_the_command_line(tmp_path: Path) -> None:
    keys = {"pretrained_model_name_or_path": str(tmp_path / "model"), "instance_prompt": "a photo of sks toy",
            "with_prior_preservation": True, "class_prompt": "a toy", "class_data_dir": str(tmp_path / "class"),
            "validation_images": ["a.png", "b.png"], "rank": 8, "learning_rate": 2e-4, "max_train_steps": 5}
    argv = ["train_dreambooth_lora.py", *flags(keys)]
    expected = load_spec_with_keys(argv)
    python_values = {**keys, "pretrained_model_name_or_path": tmp_path / "model",
                     "class_data_dir": tmp_path / "class", "validation_images": [Path("a.png"), "b.png"]}
    assert api.resolve_spec(script="train_dreambooth_lora.py", **python_values) == expected
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({**keys, "learning_rate": 1.0, "model": {"revision": "main"}}))
    from_yaml = api.resolve_spec(config, script="train_dreambooth_lora", learning_rate=2e-4)  # keywords win
    assert from_yaml[0] == load_spec([*argv, "--revision=main"]) and "revision" in from_yaml[1]
    assert api.resolve_spec(str(config), script="train_dreambooth_lora.py", learning_rate="2e-4") == from_yaml
    spec = load_spec(argv)
    assert api.resolve_spec(spec) == (spec, expected[1])  # a RunSpec's set keys: those off the defaults
    assert api.resolve_spec(spec, max_train_steps=7)[0] == load_spec([*argv, "--max_train_steps=7"])


def test_train_and_the_command_line_hand_the_backend_the_same_spec(tmp_path: Path, monkeypatch) -> None:
    ran = stand_in_trainer(monkeypatch)
    keys = {**STAND_IN, "output_dir": str(tmp_path / "out"), "max_train_steps": 2}
    assert cli.main(["train", *flags(keys)]) == 0
    jaxbooth.train(**keys)
    jaxbooth.train(load_spec(flags(keys)))
    assert len(ran) == 3 and ran[0] == ran[1] == ran[2]
    assert ran[0].data.resolution == 64 and ran[0].data.instance_data_dir == str(example_instance_dir())


def test_a_misspelt_key_names_the_closest_one_before_anything_loads(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(JaxboothError, match=r"--pretrained_model_name_or_pth: unknown option; did you mean "
                                            r"--pretrained_model_name_or_path \(section model\)\?"):
        jaxbooth.train(pretrained_model_name_or_pth=tmp_path / "model", output_dir=tmp_path / "out")
    assert time.perf_counter() - start < 2.0
    assert list(tmp_path.iterdir()) == []


BAD_CALLS = {  # id: (keyword arguments of jaxbooth.train, the error message it must give)
    "help": ({"help": True}, "help: jaxbooth.train has no help option"),
    "h": ({"h": True}, "h: jaxbooth.train has no -h option"),
    "preset": ({"preset": "train_dreambooth_lora.py"}, "pass the diffusers script as script="),
    "unknown-script": ({"script": "train_dreambooth_lor.py"}, r"unknown script .*did you mean train_dreambooth_lora"),
    "not-an-int": ({"max_train_steps": "lots"}, r"--max_train_steps='lots' is not an integer"),
    "out-of-range": ({"max_train_steps": 0}, r"--max_train_steps=0: must be >= 1"),
    "not-a-bool": ({"use_lora": "maybe"}, r"--use_lora='maybe' is not true or false"),
    "bool-for-int": ({"resolution": True}, "--resolution=True is not an integer"),
    "config-help": ({"config": "--help"}, "--help: config file not found"),
    "config-type": ({"config": 3}, "is neither a RunSpec nor a YAML file path"),
    "config-script": ({"config": "train_dreambooth_lora.py"},
                      r"a diffusers script, not a run spec; pass it as jaxbooth.train\(script="),
    "runspec-script": ({"config": "RUNSPEC", "script": "train_dreambooth_lora.py"}, "the spec is already resolved"),
}


@pytest.mark.parametrize(("call", "message"), list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_input_is_a_jaxbooth_error_never_system_exit(call: dict, message: str, tmp_path: Path) -> None:
    if call.get("config") == "RUNSPEC":
        call = {**call, "config": load_spec([])}
    try:
        jaxbooth.train(output_dir=tmp_path / "out", **call)
    except JaxboothError as error:
        assert re.search(message, str(error)), str(error)
    except SystemExit as exit_:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"SystemExit({exit_.code}) from jaxbooth.train({call})")
    else:
        pytest.fail(f"jaxbooth.train({call}) raised nothing")
    assert not (tmp_path / "out").exists()


def test_import_jaxbooth_loads_no_framework() -> None:
    code = ("import sys, time; start = time.perf_counter(); import jaxbooth; took = time.perf_counter() - start; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'torch', 'diffusers', "
            "'transformers', 'numpy', 'yaml'}); print(f'{took * 1000:.1f}', *heavy)")
    took, *heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()
    print(f"import jaxbooth: {took} ms, frameworks loaded: {heavy or 'none'}")
    assert heavy == [], f"import jaxbooth ({took} ms) loaded {heavy}"


def test_public_names_are_exactly_the_exports_and_submodules_still_import() -> None:
    assert set(jaxbooth.__all__) == {"__version__", "train", "TrainResult", "load_spec", "RunSpec", "JaxboothError",
                                     "FlaxStableDiffusionPipeline", "FlaxStableDiffusionXLPipeline"}
    assert set(jaxbooth.__all__) <= set(dir(jaxbooth))
    from jaxbooth import spec
    from jaxbooth.jax_backend import flax_pipeline

    assert (jaxbooth.load_spec, jaxbooth.RunSpec, jaxbooth.train) == (spec.load_spec, spec.RunSpec, api.train)
    assert jaxbooth.JaxboothError is JaxboothError and jaxbooth.__version__ == "0.1.0"
    assert jaxbooth.FlaxStableDiffusionPipeline is flax_pipeline.FlaxStableDiffusionPipeline
    assert jaxbooth.FlaxStableDiffusionXLPipeline is flax_pipeline.FlaxStableDiffusionXLPipeline
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        jaxbooth.trian  # noqa: B018


def test_readme_python_section_calls_train_with_spec_keys_only() -> None:
    """The README's Python examples parse, and every keyword they pass to jaxbooth.train is a spec key."""
    from jaxbooth.spec import FIELDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python\n(.*?)^## ", readme, flags=re.S | re.M)
    assert section, "README.md has no '## Python' section"
    blocks = re.findall(r"```py(?:thon)?\n(.*?)```", section.group(1), flags=re.S)
    calls = [node for block in blocks for node in ast.walk(ast.parse(block))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "train"]
    assert len(blocks) == 2 and len(calls) == 5
    keywords = {k.arg for call in calls for k in call.keywords}
    assert keywords - {"script"} <= FIELDS.keys(), keywords - FIELDS.keys()
    api.resolve_spec(**{k.arg: ast.literal_eval(k.value) for k in calls[0].keywords})
