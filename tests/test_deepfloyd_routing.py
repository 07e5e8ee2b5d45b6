"""DeepFloyd IF routing: ``backend: auto`` reads the family from model_index.json and picks torch (saying
why), ``--backend=jax`` refuses an IF pipeline at load naming ``--backend=torch``, the IF-only flags are
torch-only, ``jaxbooth generate`` hands IF to the torch sampler, and the README lists the seed's four IF
command lines.

No training and no model weights: the pipeline folders hold a model_index.json only (so anything that
tried to load a weight would fail), and the trainers and samplers are stand-ins.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from jaxbooth import api, cli, pipelines
from jaxbooth import spec as S
from jaxbooth.errors import JaxboothError
from tests.test_spec import ENV, GUIDE_COMMANDS, jaxbooth_argv

REPO = Path(__file__).resolve().parents[1]
CPU = S.DeviceInfo("cpu", None, 1)
STAGES = {"IFPipeline": "DeepFloyd IF stage I", "IFSuperResolutionPipeline": "DeepFloyd IF stage II"}


def index_only(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "x"]}))
    return folder


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, S.RunSpec]]:
    """Both backends' ``train`` replaced (no torch or jax import); returns (backend, spec) per call."""
    ran: list[tuple[str, S.RunSpec]] = []
    for backend in ("jax", "torch"):
        module = types.ModuleType(f"jaxbooth.{backend}_backend.train")
        module.train = lambda spec, backend=backend: ran.append((backend, spec))
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(api, "probe_device", lambda: CPU)  # on a CPU, auto alone would pick jax
    return ran


@pytest.mark.parametrize(("class_name", "extra", "backend", "reason"), [
    ("IFPipeline", [], "torch", "{index} names IFPipeline (DeepFloyd IF stage I), which only the torch backend trains"),
    ("IFSuperResolutionPipeline",
     ["--class_labels_conditioning=timesteps", "--validation_prompt=a dog", "--validation_images", "low.png"],
     "torch", "{index} names IFSuperResolutionPipeline (DeepFloyd IF stage II), which only the torch backend trains; "
              "--class_labels_conditioning=timesteps, --validation_images low.png are torch-only"),
    ("StableDiffusionPipeline", [], "jax", "backend auto -> jax: CPU"),
], ids=["if-stage1", "if-stage2", "sd"])
def test_auto_routes_an_if_pipeline_to_torch_and_says_why(tmp_path, capsys, trainers, class_name, extra, backend,
                                                          reason) -> None:
    model = index_only(tmp_path / "model", class_name)
    argv = ["train", "train_dreambooth_lora.py", f"--pretrained_model_name_or_path={model}",
            f"--instance_data_dir={tmp_path}", "--instance_prompt=a sks dog", f"--output_dir={tmp_path / 'out'}",
            "--report_to=none", *extra]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert [(name, spec.model.pretrained_model_name_or_path) for name, spec in trainers] == [(backend, str(model))]
    printed = capsys.readouterr().err
    assert reason.format(index=model.resolve() / "model_index.json") in printed, printed
    if backend == "torch":
        assert f"backend auto -> torch: {model.resolve() / 'model_index.json'}" in printed


def test_detected_family_reads_model_index_json_only(tmp_path, monkeypatch) -> None:
    """A Hub id fetches model_index.json alone (subfolders=[]) with the run's revision, token and cache;
    no model given is the built-in tiny SD model; a class jaxbooth does not know is left to the backend."""
    import jaxbooth.hub

    stage2 = index_only(tmp_path / "snapshot", "IFSuperResolutionPipeline")
    calls = []

    def fake_resolve(name, **kwargs):
        calls.append((name, kwargs))
        return stage2

    monkeypatch.setattr(jaxbooth.hub, "resolve_model_dir", fake_resolve)
    spec = S.load_spec(["--pretrained_model_name_or_path=DeepFloyd/IF-II-L-v1.0", "--revision=v1", "--cache_dir=c",
                        "--hub_token=hf_x"])
    assert pipelines.detected_family(spec) == ("deepfloyd_if", stage2)
    assert calls == [("DeepFloyd/IF-II-L-v1.0", {"subfolders": [], "revision": "v1", "token": "hf_x",
                                                 "cache_dir": "c"})]
    assert pipelines.detected_family(S.load_spec([])) is None
    monkeypatch.undo()
    other = index_only(tmp_path / "other", "FluxPipeline")
    assert pipelines.detected_family(S.load_spec([f"--pretrained_model_name_or_path={other}"])) is None
    assert [pipelines.family_of(name) for name in ("IFPipeline", "StableDiffusionXLPipeline", "FluxPipeline")] == [
        "deepfloyd_if", "sdxl", None]


def test_auto_with_an_if_pipeline_on_tpu_is_refused_naming_the_model(tmp_path) -> None:
    source = pipelines.family_source(index_only(tmp_path / "if", "IFPipeline"))
    with pytest.raises(JaxboothError, match=r"names IFPipeline .*only the torch backend trains.*not run on TPU"):
        S.choose_backend(S.load_spec([]), S.DeviceInfo("tpu", None, 8), model_family="deepfloyd_if",
                         family_source=source)
    # set by the user, the family is a flag like any other
    assert S.choose_backend(S.load_spec(["--model_family=deepfloyd_if"]), CPU) == (
        "torch", "backend auto -> torch: --model_family=deepfloyd_if is torch-only")


@pytest.mark.parametrize("class_name", list(STAGES))
def test_backend_jax_refuses_an_if_pipeline_at_load(tmp_path, class_name) -> None:
    from jaxbooth.jax_backend import loading

    model = index_only(tmp_path / "model", class_name)
    spec = S.load_spec(["--backend=jax", f"--pretrained_model_name_or_path={model}"])
    assert api.resolve_backend(spec) == "jax"  # explicit: kept, and refused by the backend's load
    with pytest.raises(JaxboothError) as info:
        loading.resolve_model_paths(spec)
    message = str(info.value)
    for part in (str(model / "model_index.json"), f"_class_name={class_name}", STAGES[class_name],
                 "which the jax backend does not train", "use --backend=torch"):
        assert part in message, (part, message)


@pytest.mark.parametrize(("args", "flag"), [
    (["--model_family=deepfloyd_if"], "--model_family=deepfloyd_if"),
    (["--class_labels_conditioning=timesteps"], "--class_labels_conditioning=timesteps"),
    (["--validation_prompt=a dog", "--validation_images", "a.png", "b.png"], "--validation_images a.png b.png"),
])
def test_if_only_flags_are_refused_on_jax(args, flag) -> None:
    with pytest.raises(JaxboothError) as info:
        S.load_spec(["--backend=jax", *args])
    assert f"{flag} is only supported by the torch backend; use --backend=torch" in str(info.value)
    S.check_backend(S.load_spec(["--backend=torch", *args]), "torch")
    assert S.choose_backend(S.load_spec(args), CPU)[0] == "torch"


@pytest.fixture
def samplers(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """``jaxbooth.lora.base_model.sampled_pipeline_class`` reads the class a stand-in folder names; both
    ``generate_to_dir`` are stand-ins recording their calls."""
    calls: dict[str, list] = {"class": [], "jax": [], "torch": []}

    def sampled_pipeline_class(model_dir: str, base: str | None) -> str:
        calls["class"].append((model_dir, base))
        return json.loads((Path(base or model_dir) / "model_index.json").read_text())["_class_name"]

    modules = {"jaxbooth.lora.base_model": {"sampled_pipeline_class": sampled_pipeline_class}}
    for backend in ("jax", "torch"):
        def generate_to_dir(model_dir, prompt, backend=backend, **kwargs):
            calls[backend].append((model_dir, prompt, kwargs))
            return [Path(kwargs["out_dir"]) / "0.png"]

        modules[f"jaxbooth.{backend}_backend.generate"] = {"generate_to_dir": generate_to_dir}
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize(("class_name", "lora", "image", "backend"), [
    ("IFPipeline", False, False, "torch"),
    ("IFPipeline", True, False, "torch"),  # a LoRA whose base is IF
    ("IFSuperResolutionPipeline", False, True, "torch"),
    ("StableDiffusionPipeline", False, False, "jax"),
    ("StableDiffusionXLPipeline", True, False, "jax"),
])
def test_generate_dispatches_if_to_torch(tmp_path, capsys, samplers, class_name, lora, image, backend) -> None:
    base = index_only(tmp_path / "base", class_name)
    low_res = tmp_path / "low.png"
    low_res.write_bytes(b"")
    model = tmp_path / "lora" if lora else base
    argv = ["generate", str(model), "a sks dog", "-n", "2", "--out", str(tmp_path / "samples"),
            *(["--pretrained_model_name_or_path", str(base), "--lora_scale=0.5"] if lora else []),
            *(["--image", str(low_res)] if image else [])]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert samplers["class"] == [(str(model), str(base) if lora else None)]
    other = "jax" if backend == "torch" else "torch"
    assert samplers[other] == [] and len(samplers[backend]) == 1
    model_dir, prompt, kwargs = samplers[backend][0]
    assert (model_dir, prompt, kwargs["num_images"]) == (str(model), "a sks dog", 2)
    lora_options = (kwargs["pretrained_model_name_or_path"], kwargs["lora_scale"])
    assert lora_options == ((str(base), 0.5) if lora else (None, None))
    if backend == "torch":
        assert kwargs["image"] == (str(low_res) if image else None)
    else:
        assert "image" not in kwargs
    assert capsys.readouterr().out.split() == [str(tmp_path / "samples" / "0.png")]


@pytest.mark.parametrize(("class_name", "image", "message"), [
    ("IFSuperResolutionPipeline", None, "pass the low-resolution one with --image PATH"),
    ("IFSuperResolutionPipeline", "missing.png", "--image missing.png: no such file"),
    ("IFPipeline", "low.png", "takes no input image"),
    ("StableDiffusionPipeline", "low.png", "drop --image"),
])
def test_generate_image_is_for_if_stage2_only(tmp_path, capsys, samplers, monkeypatch, class_name, image,
                                             message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "low.png").write_bytes(b"")
    model = index_only(tmp_path / "model", class_name)
    argv = ["generate", str(model), "a dog", *(["--image", image] if image else [])]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert samplers["jax"] == samplers["torch"] == []


def readme_if_commands() -> list[str]:
    """The `jaxbooth train` commands of the README's DeepFloyd IF section, as printed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## DeepFloyd IF\n(.*?)^## ", text, flags=re.S | re.M)
    assert section, "README.md has no '## DeepFloyd IF' section"
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S):
        match = re.search(r"^jaxbooth train train_dreambooth\w*\.py.*", block, flags=re.S | re.M)
        if match:
            found.append(match.group(0).rstrip())
    return found


def test_readme_lists_the_seeds_four_if_commands() -> None:
    """The seed's four IF command lines (tests/test_spec.py GUIDE_COMMANDS, checked there against the guide),
    each with `jaxbooth train` in place of its launcher, and the same script and flags."""
    readme = readme_if_commands()
    seed = [GUIDE_COMMANDS[name] for name in ("if_stage1_lora", "if_stage2_lora", "if_stage1_full", "if_stage2_full")]
    assert len(readme) == len(seed)
    for ours, theirs in zip(readme, seed, strict=True):
        script = re.search(r"train_dreambooth\w*\.py", theirs).group(0)
        assert ours.startswith(f"jaxbooth train {script} "), ours[:80]
        assert jaxbooth_argv(ours) == jaxbooth_argv(theirs)
    assert set(re.findall(r"\$(\w+)", " ".join(readme))) <= set(ENV)
