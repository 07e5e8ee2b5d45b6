"""Smoke test of scripts/bench_lora.py: its launches, measurements, ratios and JSON line, in seconds.

The trainer is a stand-in console script (a real jaxbooth launch costs ~15 s of imports, and the
script makes eight): it checks the flags and folders the script hands it and writes what jaxbooth
writes (the LoRA file or a unet/ folder, metrics.jsonl), with known sizes so the ratios are exact.
Nothing asserts on wall time (STYLE.md: benchmarks are scripts, not timed tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

STUB = """#!{python}
import json, os, pathlib, sys
flags = dict(a.split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
assert sys.argv[1] == "train", sys.argv
assert (pathlib.Path(flags["--pretrained_model_name_or_path"]) / "model_index.json").exists(), flags
assert any(pathlib.Path(flags["--instance_data_dir"]).iterdir()), flags
assert flags["--resolution"] == "64" and flags["--train_batch_size"] == "1", flags
script = os.environ.get("STUB_LORA_SCRIPT", "train_dreambooth_lora.py")
lora = script in sys.argv
assert lora or not any(a.startswith("train_dreambooth") for a in sys.argv), sys.argv
assert (flags.get("--rank") == "4") == lora, flags
out, steps = pathlib.Path(flags["--output_dir"]), int(flags["--max_train_steps"])
out.mkdir(parents=True)
with open(out / "metrics.jsonl", "w") as f:
    for step in range(1, steps + 1):
        f.write(json.dumps({{"step": step, "time": 100.0 + 0.25 * step}}) + "\\n")
if lora and not os.environ.get("STUB_NO_LORA"):
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"0" * 1000)
elif not lora:
    (out / "unet").mkdir()
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 40000)
    (out / "unet" / "config.json").write_bytes(b"0" * 10000)
"""


def run_bench(tmp_path: Path, model_dir: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    stub = tmp_path / "jaxbooth"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_lora.py"), "--smoke", "--jaxbooth", str(stub),
                           "--model-dir", str(model_dir), "--n1", "1", "--n2", "3", *args],
                          capture_output=True, text=True, env=environment, timeout=120)
    (line,) = proc.stdout.strip().splitlines()
    return proc, json.loads(line)


def test_bench_lora_smoke_measures_every_row_and_compares_lora_with_full(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc, record = run_bench(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr
    assert record["bench"] == "lora" and record["config"]["size"] == "tiny" and not record["config"]["peer_harness"]
    assert list(record["rows"]) == ["jaxbooth-jax-lora", "jaxbooth-torch-lora", "jaxbooth-jax", "jaxbooth-torch"]
    assert [(r["row"], r["steps"]) for r in record["runs"]][:2] == [("jaxbooth-jax-lora", 1), ("jaxbooth-jax-lora", 3)]
    for row in record["rows"].values():
        assert row["ok"] and isinstance(row["s_per_step"], float) and isinstance(row["startup_s"], float)
        assert abs(row["s_per_step_logged"] - 0.25) < 1e-9  # from the N2 run's metrics.jsonl
    for backend in ("jax", "torch"):
        versus = record["lora_vs_full"][backend]
        assert versus["lora_file_bytes"] == 1000 and versus["unet_bytes_full"] == 50000
        assert abs(versus["size_ratio"] - 0.02) < 1e-12
    assert record["vs_diffusers_lora"] == {}  # no peers in a smoke run
    assert "LoRA vs full" in proc.stderr

    # a LoRA row that exits 0 without writing a LoRA file is a failure, named, and the JSON line still comes
    (tmp_path / "broken").mkdir()
    proc, record = run_bench(tmp_path / "broken", tiny_model_dir, "--rows", "jaxbooth-torch-lora", STUB_NO_LORA="1")
    assert proc.returncode == 1
    (row,) = record["rows"].values()
    assert not row["ok"] and "pytorch_lora_weights.safetensors" in row["errors"][0]


def test_bench_lora_sdxl_family_names_its_rows_and_runs_the_sdxl_script(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc, record = run_bench(tmp_path, tiny_model_dir, "--family", "sdxl",
                             STUB_LORA_SCRIPT="train_dreambooth_lora_sdxl.py")
    assert proc.returncode == 0, proc.stderr
    assert record["config"]["family"] == "sdxl"
    assert list(record["rows"]) == ["jaxbooth-jax-lora-sdxl", "jaxbooth-torch-lora-sdxl", "jaxbooth-jax-sdxl",
                                    "jaxbooth-torch-sdxl"]
    assert all(row["ok"] for row in record["rows"].values())
    assert abs(record["lora_vs_full"]["jax"]["size_ratio"] - 0.02) < 1e-12


def test_bench_lora_ratios_against_diffusers_and_the_targets() -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_lora import ratios
    finally:
        sys.path.remove(str(SCRIPTS))

    def row(step: float, peak: float) -> dict:
        return {"ok": True, "s_per_step": step, "startup_s": 10.0, "peak_rss_gb": peak, "lora_file_bytes": 100,
                "unet_bytes": None}

    rows = {"diffusers-lora": row(0.6, 1.0), "jaxbooth-jax-lora": row(0.3, 0.8), "jaxbooth-torch-lora": row(0.55, 1.1)}
    result = ratios(rows)
    jax, torch = result["vs_diffusers_lora"]["jax"], result["vs_diffusers_lora"]["torch"]
    assert abs(jax["speedup"] - 2.0) < 1e-12 and abs(jax["peak_ratio"] - 1.25) < 1e-12
    assert result["targets"]["jax"] == {"speedup_min": 1.5, "speedup_met": True, "peak_met": True}
    assert result["targets"]["torch"]["speedup_met"] is False and result["targets"]["torch"]["peak_met"] is False
    assert torch["speedup"] < 1.2 and result["lora_vs_full"] == {}
    sdxl = ratios({f"{name}-sdxl": value for name, value in rows.items()}, "-sdxl")
    assert sdxl["vs_diffusers_lora"] == result["vs_diffusers_lora"] and ratios(rows, "-sdxl")["targets"] == {}
