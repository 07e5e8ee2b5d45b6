"""``--push_to_hub`` against a local stand-in for the Hub's HTTP API (tests/_hub_standin.py).

Each run is ``jaxbooth train`` in a subprocess, as a user runs it, with ``HF_ENDPOINT`` pointing at the stand-in,
``--hub_token`` given and another token in ``HF_TOKEN`` (the flag wins; neither may leak). The JAX run pushes a
full fine-tune; the torch LoRA run's commit is refused once, so it must exit with the retry command, keep its
output, and that command, run as printed, must upload the folder.

Each backend's push is the resumed half of a run that also generates class images, validates, checkpoints
every step and writes TensorBoard logs: every byte those runs wrote (outputs, class images, HF_HOME) and
printed, and what ``jaxbooth spec`` prints for the same flags, is searched for both tokens.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jaxbooth import hub_push, output
from jaxbooth.errors import JaxboothError
from tests._hub_standin import HubStandIn

TOKEN = "hf_PushFlagTokenMustNeverLeak0123"
ENV_TOKEN = "hf_PushEnvTokenMustNeverLeak4567"
SECRETS = (TOKEN, ENV_TOKEN)
TINY = ["--resolution=64", "--train_batch_size=1", "--lr_warmup_steps=0", "--log_every_steps=1",
        "--report_to=tensorboard"]
SD_TAGS = ["stable-diffusion", "stable-diffusion-diffusers"]


def hub_env(hub: HubStandIn, root: Path, token: str = ENV_TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(root / "hf-home"),
            "HF_TOKEN": token}


def train(hub: HubStandIn, root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxbooth", "train", *TINY, *flags, f"--hub_token={TOKEN}"],
                          cwd=root, env=hub_env(hub, root), capture_output=True, text=True, timeout=600)


def two_halves(hub: HubStandIn, root: Path, *flags: str, push: tuple[str, ...]) -> tuple:
    """Step 1 with a checkpoint, then resumed to step 2 with ``push``: (first run, resumed run)."""
    busy = ["--checkpointing_steps=1", "--validation_prompt=a photo of sks toy", "--validation_steps=2",
            "--num_validation_images=1", "--with_prior_preservation", f"--class_data_dir={root / 'class'}",
            "--class_prompt=a photo of a toy", "--num_class_images=1", "--sample_batch_size=1", *flags]
    first = train(hub, root, *busy, "--max_train_steps=1")
    assert first.returncode == 0, first.stderr[-4000:]
    return first, train(hub, root, *busy, "--max_train_steps=2", "--resume_from_checkpoint=latest", *push)


def printed_spec(root: Path, *flags: str) -> subprocess.CompletedProcess:
    """What ``jaxbooth spec`` prints for a run's flags (the resolved spec never holds the token)."""
    env = {**os.environ, "HF_TOKEN": ENV_TOKEN, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "jaxbooth", "spec", *TINY, *flags, f"--hub_token={TOKEN}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def leaked(root: Path, *runs: subprocess.CompletedProcess) -> list[str]:
    files = [f"{name}: {s}" for name, path in local_files(root).items() for s in SECRETS if s.encode() in
             path.read_bytes()]
    return files + [f"printed: {s}" for run in runs for s in SECRETS if s in run.stdout + run.stderr]


def local_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def uploadable(folder: Path) -> dict[str, Path]:
    """The output's files but those push_to_hub documents it leaves local (hub_push.IGNORE_PATTERNS)."""
    return {name: path for name, path in local_files(folder).items()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in hub_push.IGNORE_PATTERNS)}


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(scope="module")
def jax_push(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub-jax")
    flags = ("--backend=jax", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={root / 'out'}")
    with HubStandIn(TOKEN) as hub:
        first, run = two_halves(hub, root, *flags, push=("--push_to_hub", "--hub_model_id=me/dog"))
    assert run.returncode == 0, run.stderr[-4000:]
    printed = printed_spec(root, *flags)
    assert printed.returncode == 0, printed.stderr[-3000:]
    return SimpleNamespace(root=root, out=root / "out", run=run, hub=hub, first=first, printed=printed)


def test_push_creates_the_repo_and_commits_every_output_file(jax_push) -> None:
    hub, out = jax_push.hub, jax_push.out
    assert "pushed to the Hub: me/dog" in jax_push.run.stderr
    creates = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert [json.loads(r.body) for r in creates] == [{"name": "dog", "organization": "me"}]
    assert (hub.unknown, hub.errors) == ([], [])
    assert [c.summary for c in hub.repos["me/dog"].commits] == [hub_push.COMMIT_MESSAGE]
    committed, expected = hub.files("me/dog"), uploadable(out)
    assert set(committed) == set(expected)
    assert {"unet/diffusion_pytorch_model.safetensors", "README.md", "metrics.jsonl", output.SPEC_FILENAME} <= \
        set(committed)
    assert any(name.startswith("checkpoint-2/") for name in local_files(out)), "the run left no checkpoint to skip"
    assert not [name for name in committed if name.startswith("checkpoint-")]  # resumable state stays local
    for name, entry in committed.items():  # what the Hub holds is the local file, byte for byte
        data = expected[name].read_bytes()
        if entry.mode == "regular":
            assert entry.content == data, name
        else:
            assert (entry.oid, entry.size) == (hashlib.sha256(data).hexdigest(), len(data)), name


def test_weights_and_event_files_go_as_large_files(jax_push) -> None:
    committed = jax_push.hub.files("me/dog")
    large = {name for name, entry in committed.items() if entry.mode == "lfs"}
    weights = {name for name in committed if name.endswith(".safetensors")}
    assert len(weights) == 3 and weights <= large  # unet, vae, text encoder
    assert any("tfevents" in name for name in large)
    assert not {name for name in large if name.endswith((".json", ".yaml", ".md", ".txt", ".jsonl"))}
    puts = [r for r in jax_push.hub.requests if r.method == "PUT"]
    assert {r.path.rsplit("/", 1)[-1] for r in puts} == {committed[name].oid for name in large}
    commit = next(r for r in jax_push.hub.requests if r.path.endswith("/commit/main"))
    assert len(commit.body) < 100_000, "weights went inline in the commit instead of to large-file storage"


def test_the_token_travels_only_in_the_authorization_header(jax_push) -> None:
    requests = jax_push.hub.requests
    assert requests and all(r.status < 400 for r in requests)
    for request in requests:
        storage = request.method == "PUT" or request.path == "/api/agent-harnesses"
        assert request.headers.get("authorization") == (None if storage else f"Bearer {TOKEN}"), request.path
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        for secret in SECRETS:
            assert secret not in request.path + json.dumps(request.query) + json.dumps(others), request.path
            assert secret.encode() not in request.body, request.path
    assert not any(ENV_TOKEN in r.headers.get("authorization", "") for r in requests)


def test_no_file_or_output_of_the_runs_holds_the_token(jax_push) -> None:
    files = local_files(jax_push.root)  # output (checkpoints, logs, spec, card, validation), class images, HF_HOME
    assert all(any(name.startswith(f"out/checkpoint-{n}/") for name in files) for n in (1, 2)) and len(files) > 20
    assert [name for name in files if name.startswith("class/")] and \
        [name for name in files if name.startswith("out/validation/") and name.endswith(".png")], "it wrote too little"
    assert leaked(jax_push.root, jax_push.first, jax_push.run, jax_push.printed) == []


def test_the_card_carries_tags_figures_and_a_header_the_hub_accepts(jax_push, tiny_model_dir: Path) -> None:
    hub, out = jax_push.hub, jax_push.out
    card = hub.files("me/dog")["README.md"].content.decode()
    assert card == (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"] == ["text-to-image", "dreambooth", "diffusers", *SD_TAGS, "jaxbooth"]
    assert meta["instance_prompt"] == "a photo of sks toy" and meta["library_name"] == "diffusers"
    assert "base_model" not in meta and f"`{tiny_model_dir}`" in card  # a local base: text only (Hub rule)
    assert [r.status for r in hub.requests if r.path == "/api/validate-yaml"] and \
        all(r.status == 200 for r in hub.requests if r.path == "/api/validate-yaml")
    assert "(jax backend)" in card and "for 2 optimizer steps" in card
    last = json.loads((out / output.METRICS_FILENAME).read_text().splitlines()[-1])
    assert f"| final loss (step 2) | {last['train/loss']:.4f} |" in card
    assert "| mean speed | " in card and "optimizer steps/s |" in card and "| time in the training loop | " in card


@pytest.fixture(scope="module")
def torch_lora_push(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("hub-torch")
    out = root / "dog-lora"  # no --hub_model_id: the folder's name under the token's account
    with HubStandIn(TOKEN) as hub:
        hub.fail_commits = 1
        flags = ("--backend=torch", "--use_lora", f"--pretrained_model_name_or_path={tiny_model_dir}",
                 f"--output_dir={out}")
        first, run = two_halves(hub, root, *flags, push=("--push_to_hub",))
        after_failure = {name: path.read_bytes() for name, path in local_files(out).items()}
        command = next((line.strip() for line in run.stderr.splitlines() if line.strip().startswith("hf upload")), "")
        argv = shlex.split(command)
        retry = None
        if argv:  # as printed, after `export HF_TOKEN=...` (the message's advice); `hf` of this environment
            argv[0] = str(Path(sys.executable).with_name("hf"))
            retry = subprocess.run(argv, cwd=root, env=hub_env(hub, root, token=TOKEN), capture_output=True,
                                   text=True, timeout=300)
    printed = printed_spec(root, *flags)
    return SimpleNamespace(root=root, out=out, run=run, hub=hub, after_failure=after_failure, command=command,
                           retry=retry, first=first, printed=printed)


@pytest.mark.requires_torch
def test_a_failed_upload_keeps_the_output_and_prints_a_token_free_retry(torch_lora_push) -> None:
    run, out = torch_lora_push.run, torch_lora_push.out
    assert run.returncode == 2, run.stderr[-4000:]
    assert "push_to_hub: uploading" in run.stderr and "500" in run.stderr
    assert f"The trained output is kept in {out}" in run.stderr
    assert torch_lora_push.command.startswith(f"hf upload me/dog-lora {out} . --exclude 'checkpoint-*'")
    kept = torch_lora_push.after_failure
    assert {"pytorch_lora_weights.safetensors", "README.md", output.SPEC_FILENAME, output.METRICS_FILENAME} <= \
        set(kept) and "checkpoint-2/pytorch_lora_weights.safetensors" in kept
    assert [name for name in kept if name.startswith("validation/") and name.endswith(".png")]
    assert torch_lora_push.printed.returncode == 0, torch_lora_push.printed.stderr[-3000:]
    assert leaked(torch_lora_push.root, torch_lora_push.first, run, torch_lora_push.printed) == []


@pytest.mark.requires_torch
def test_the_printed_retry_command_uploads_the_lora_folder(torch_lora_push) -> None:
    hub, out, retry = torch_lora_push.hub, torch_lora_push.out, torch_lora_push.retry
    assert retry is not None and retry.returncode == 0, (retry.stderr if retry else "no command")[-3000:]
    assert (hub.unknown, hub.errors) == ([], [])
    assert [json.loads(r.body) for r in hub.requests if r.path == "/api/repos/create"][0] == \
        {"name": "dog-lora", "organization": None}
    committed = hub.files("me/dog-lora")
    assert set(committed) == set(uploadable(out))
    assert committed["pytorch_lora_weights.safetensors"].mode == "lfs"
    card = committed["README.md"].content.decode()
    meta = front_matter(card)
    assert meta["tags"] == ["text-to-image", "lora", "dreambooth", "diffusers", *SD_TAGS, "jaxbooth"]
    assert "base_model" not in meta and "(torch backend)" in card and "| final loss (step 2) |" in card


# ---------------------------------------------------------------------- card and message pieces, no run


def test_family_tags_follow_the_base_pipeline() -> None:
    assert output.card_tags("StableDiffusionXLPipeline", "lora", "dreambooth") == [
        "text-to-image", "lora", "dreambooth", "diffusers", "sdxl", "stable-diffusion-xl",
        "stable-diffusion-xl-diffusers", "jaxbooth"]
    assert output.card_tags("IFPipeline", "dreambooth")[3:5] == ["if", "if-diffusers"]
    assert output.card_tags("StableDiffusionPipeline", "dreambooth")[3:5] == SD_TAGS
    assert output.card_tags("KandinskyPipeline", "dreambooth") == ["text-to-image", "dreambooth", "diffusers",
                                                                   "jaxbooth"]


def test_dora_cards_are_tagged_dora_and_sdxl(tmp_path: Path) -> None:
    from jaxbooth.lora.card import lora_model_card
    from jaxbooth.lora.settings import AdapterSettings

    card = lora_model_card(base_model="stabilityai/stable-diffusion-xl-base-1.0", instance_prompt="a sks: dog",
                           settings=AdapterSettings(rank=4, use_dora=True), targets={"unet": ["to_k"]}, steps=3,
                           backend="jax", pipeline_class="StableDiffusionXLPipeline")
    meta = front_matter(card)
    assert {"lora", "dora", "sdxl", "stable-diffusion-xl"} <= set(meta["tags"])
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["instance_prompt"] == "a sks: dog" and meta["license"] == "openrail++"


def test_only_a_hub_id_becomes_the_cards_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-sd").mkdir()
    assert output.card_base_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert output.card_base_model(str(tmp_path / "local-sd")) is None
    assert output.card_base_model("local-sd") is None  # a folder here, as from_pretrained reads it
    assert output.card_base_model("../models/sd") is None
    snapshot = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc123"
    assert output.card_base_model(str(snapshot)) == "stabilityai/sdxl-turbo"


def test_training_figures_add_up_windows_across_a_resume(tmp_path: Path) -> None:
    assert output.training_figures(tmp_path) is None
    rows = [(2, 1.0, 0.5), (4, 0.9, 1.0),  # steps 1-2 in 4 s, 3-4 in 2 s; then a resume from checkpoint 2:
            (3, 0.95, 0.5), (4, 0.8, 1.0)]  # step 3 counted from 2 (2 s), step 4 (1 s)
    lines = [json.dumps({"step": s, "time": 0.0, "train/loss": loss, "perf/steps_per_sec": rate})
             for s, loss, rate in rows]
    (tmp_path / output.METRICS_FILENAME).write_text("\n".join(lines) + '\n{"step": 5, "tim')  # a killed writer
    figures = output.training_figures(tmp_path)
    assert figures == {"step": 4, "final_loss": 0.8, "steps_per_sec": pytest.approx(6 / 9),
                       "train_seconds": pytest.approx(9.0)}
    card = output.model_card(base_model="sd", instance_prompt="p", train_text_encoder=False, steps=4, backend="jax",
                             figures=figures)
    assert "| final loss (step 4) | 0.8000 |" in card and "| time in the training loop | 9.0 s |" in card


def test_a_failed_push_raises_without_the_token_or_a_chained_request(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def refuse(repo_id: str, **kwargs: object) -> None:
        raise RuntimeError(f"401 for Bearer {kwargs['token']} and hf_SomeOtherSavedToken99")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    (tmp_path / "out").mkdir()
    with pytest.raises(JaxboothError) as caught:
        output.push_to_hub(tmp_path / "out", repo_id=None, token=TOKEN)
    message = str(caught.value)
    assert TOKEN not in message and "hf_SomeOtherSavedToken99" not in message and "401 for Bearer" in message
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    assert f"hf upload out {tmp_path / 'out'} ." in message and (tmp_path / "out").is_dir()


@pytest.mark.parametrize(("version", "expected"), [
    ("0.30.2", "huggingface-cli upload me/x /o . --exclude 'checkpoint-*' 'step_*' 'epoch_*' '*.tmp*'"),
    ("0.36.0", "hf upload me/x /o . --exclude 'checkpoint-*' 'step_*' 'epoch_*' '*.tmp*'"),
    ("1.3.0", "hf upload me/x /o . --exclude 'checkpoint-*' --exclude 'step_*' --exclude 'epoch_*' "
              "--exclude '*.tmp*'"),
])
def test_the_retry_command_fits_the_installed_cli(version: str, expected: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "__version__", version)
    assert hub_push.retry_command(Path("/o"), "me/x") == f"{expected} --commit-message 'jaxbooth: end of training'"
