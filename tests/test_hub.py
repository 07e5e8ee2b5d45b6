"""jaxbooth.hub: local folders, the HF cache offline, download patterns and fallbacks.

No test touches the network: offline tests set HF_HUB_OFFLINE and block sockets, and the
download-logic test replaces ``snapshot_download`` with a fake Hub built from a file list.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxbooth import hub
from jaxbooth.errors import JaxboothError

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_fake_cache(cache: Path, repo_id: str, files: dict[str, str], *, sha: str = SHA,
                    ref: str | None = "main") -> Path:
    """The HF cache layout by hand: ``models--o--n/snapshots/<sha>/...`` plus ``refs/<ref>``."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / sha
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE for this process, and any socket connect fails the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    assert hub.resolve_model_dir(tmp_path) == tmp_path.resolve()
    assert hub.resolve_model_dir(str(tmp_path), variant="fp16") == tmp_path.resolve()


def test_missing_local_path_that_is_not_a_hub_id_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(JaxboothError, match="no such directory") as info:
        hub.resolve_model_dir(missing)
    assert str(missing) in str(info.value)


def test_a_file_is_rejected_with_the_single_file_hint(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(JaxboothError, match="from_single_file"):
        hub.resolve_model_dir(ckpt)


@pytest.mark.parametrize("name, expected", [
    ("owner/name", True), ("stable-diffusion-v1-5/stable-diffusion-v1-5", True), ("a.b/c_d-1", True),
    ("./owner/name", False), ("/abs/path", False), ("a/b/c", False), ("../x", False), ("name", False),
    ("own..er/name", False),
])
def test_looks_like_hub_id(name: str, expected: bool) -> None:
    assert hub.looks_like_hub_id(name) is expected


def test_offline_without_cache_is_one_error_naming_repo_revision_cache_and_fix(
    tmp_path: Path, offline: None
) -> None:
    with pytest.raises(JaxboothError) as info:
        hub.resolve_model_dir("owner/absent-model", revision="v1", cache_dir=tmp_path / "cache")
    message = str(info.value)
    for expected in ("owner/absent-model", "'v1'", str(tmp_path / "cache"), "HF_HUB_OFFLINE",
                     "hf download owner/absent-model --revision v1", "HF_HOME", "local diffusers folder"):
        assert expected in message


def test_prepopulated_cache_resolves_offline(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "cache"
    snapshot = make_fake_cache(cache, "owner/tiny-sd", {
        "model_index.json": "{}",
        "unet/config.json": "{}",
        "unet/diffusion_pytorch_model.safetensors": "w",
        "text_encoder/config.json": "{}",
        "text_encoder/flax_model.msgpack": "w",
        "tokenizer/vocab.json": "{}",
    })
    assert hub.resolve_model_dir("owner/tiny-sd", cache_dir=cache) == snapshot
    assert hub.resolve_model_dir("owner/tiny-sd", cache_dir=cache, variant="fp16") == snapshot
    # A commit hash is looked up under snapshots/ directly, no ref needed.
    assert hub.resolve_model_dir("owner/tiny-sd", cache_dir=cache, revision=SHA) == snapshot


def test_cache_dir_is_honoured_instead_of_the_default_cache(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cache_dir is where models are looked up (as diffusers' from_pretrained(cache_dir=...)), not HF_HUB_CACHE."""
    from huggingface_hub import constants

    default, chosen = tmp_path / "default", tmp_path / "chosen"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(default))
    in_default = make_fake_cache(default, "owner/only-default", {"unet/config.json": "{}"})
    in_chosen = make_fake_cache(chosen, "owner/only-chosen", {"unet/config.json": "{}"})
    assert hub.resolve_model_dir("owner/only-default") == in_default
    assert hub.resolve_model_dir("owner/only-chosen", cache_dir=chosen) == in_chosen
    assert hub.resolve_model_dir("owner/only-chosen", cache_dir=str(chosen)) == in_chosen
    with pytest.raises(JaxboothError) as info:
        hub.resolve_model_dir("owner/only-default", cache_dir=chosen)
    assert str(chosen) in str(info.value) and "--cache_dir" in str(info.value)
    with pytest.raises(JaxboothError, match="only-chosen"):
        hub.resolve_model_dir("owner/only-chosen")


def test_cache_without_the_requested_branch_is_an_error(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "cache"
    make_fake_cache(cache, "owner/tiny-sd", {"model_index.json": "{}"})
    with pytest.raises(JaxboothError, match="'fp16-branch'"):
        hub.resolve_model_dir("owner/tiny-sd", cache_dir=cache, revision="fp16-branch")


def _matches(path: str, patterns: list[str]) -> bool:
    from huggingface_hub.utils import filter_repo_objects

    return bool(list(filter_repo_objects([path], allow_patterns=patterns)))


def test_allow_patterns_fetch_one_weight_format_and_skip_pickles_and_other_variants() -> None:
    fp16 = hub.allow_patterns(["unet", "text_encoder"], weights="safetensors", variant="fp16")
    for wanted in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                   "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                   "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                   "text_encoder/model.fp16.safetensors",
                   "text_encoder/model.fp16-00002-of-00002.safetensors"):
        assert _matches(wanted, fp16), wanted
    for unwanted in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                     "unet/diffusion_pytorch_model.bf16.safetensors", "unet/diffusion_flax_model.msgpack",
                     "vae/diffusion_pytorch_model.fp16.safetensors", "safety_checker/model.fp16.safetensors"):
        assert not _matches(unwanted, fp16), unwanted
    plain = hub.allow_patterns(["unet"], weights="safetensors")
    assert _matches("unet/diffusion_pytorch_model.safetensors", plain)
    assert _matches("unet/diffusion_pytorch_model-00001-of-00003.safetensors", plain)
    assert not _matches("unet/diffusion_pytorch_model.fp16.safetensors", plain)
    assert _matches("unet/diffusion_flax_model.msgpack", hub.allow_patterns(["unet"], weights="msgpack"))


def test_download_takes_variant_then_plain_then_msgpack_per_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake Hub: the variant pass, then fallbacks only for components that still lack weights."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = [
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "vae/config.json", "vae/diffusion_flax_model.msgpack", "vae/diffusion_pytorch_model.bin",
        "safety_checker/config.json", "safety_checker/model.safetensors",
    ]
    snapshot = tmp_path / "snapshot"
    calls: list[list[str]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        assert repo_id == "owner/sd" and kwargs["revision"] == "main" and kwargs["token"] == "tok"
        assert kwargs["cache_dir"] == str(tmp_path / "models")
        calls.append(list(kwargs["allow_patterns"]))
        for name in filter_repo_objects(remote, allow_patterns=kwargs["allow_patterns"]):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = hub.resolve_model_dir("owner/sd", revision="main", variant="fp16", token="tok",
                                cache_dir=str(tmp_path / "models"))
    assert got == snapshot
    fetched = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert fetched == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "vae/config.json", "vae/diffusion_flax_model.msgpack",
    ])
    assert len(calls) == 3
    assert not any(p.startswith("unet/") for p in calls[1]), "unet had its variant; no plain pass for it"
    assert {p.split("/")[0] for p in calls[2] if "/" in p} == {"vae"}


def test_import_is_framework_free_and_env_offline_mode_works(tmp_path: Path) -> None:
    """In a fresh interpreter with HF_HUB_OFFLINE=1 and a temp HF_HOME: no jax/torch, no network."""
    home = tmp_path / "hf_home"
    snapshot = make_fake_cache(home / "hub", "owner/cached", {"unet/config.json": "{}"})
    script = textwrap.dedent(f"""
        import socket, sys
        def no_network(*a, **k):
            raise AssertionError("network")
        socket.socket.connect = no_network
        import jaxbooth.hub as hub
        from jaxbooth.errors import JaxboothError
        assert str(hub.resolve_model_dir("owner/cached")) == {str(snapshot)!r}
        try:
            hub.resolve_model_dir("owner/not-cached")
        except JaxboothError as error:
            message = str(error)
        else:
            raise SystemExit("no error")
        assert {str(home / "hub")!r} in message and "owner/not-cached" in message, message
        heavy = sorted(m for m in ("jax", "torch", "flax") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

