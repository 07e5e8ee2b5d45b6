"""scripts/bench_device.py: its smoke run prints one well-formed JSON line per requested row, and its
budget, row selection, peak table and failure handling behave as documented.

The smoke run takes a subset of the rows that still reaches every code path (JAX full and LoRA, SD and
SDXL shapes, torch LoRA, a memory recipe): each JAX row is a train-step compile, ~10-30 s on 2 loaded
cores, so all eight would not fit a test. Nothing asserts on wall time (STYLE.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SMOKE_ROWS = ["jax-sd15-full-b8", "jax-sdxl-lora-b1", "torch-sdxl-lora-b1", "torch-sd15-12gb-b1"]
POSITIVE = ("s_per_step", "s_per_step_min", "first_step_s", "images_per_s", "model_flops", "peak_flops_per_s",
            "achieved_flops_per_s", "mfu", "peak_memory_bytes", "peak_memory_gb", "unet_params", "trained_params",
            "steps", "wall_s")
TEXT = ("device_kind", "platform", "precision", "attention", "attention_resolved", "optimizer", "peak_source",
        "peak_memory_source", "model_flops_source")


def bench(*args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_device.py"), "--smoke", "--steps", "1", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is one JSON record


@pytest.fixture(scope="module")
def smoke() -> tuple[subprocess.CompletedProcess, list[dict]]:
    pytest.importorskip("diffusers")
    return bench("--rows", ",".join(SMOKE_ROWS))


def test_smoke_prints_one_json_line_per_requested_row_with_the_documented_fields(smoke) -> None:
    proc, records = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["row"] for r in records] == SMOKE_ROWS
    by_row = {r["row"]: r for r in records}
    peft = "peft" in by_row["jax-sd15-full-b8"]["versions"] or by_row["torch-sdxl-lora-b1"]["status"] == "ok"
    for name, record in by_row.items():
        if record["status"] == "skipped":
            assert record["reason"], name
            continue
        assert record["status"] == "ok", record
        assert record["bench"] == "device" and record["shape"] == "smoke" and record["versions"]["jax"]
        for key in POSITIVE:
            assert isinstance(record[key], (int, float)) and record[key] > 0, (name, key, record[key])
        for key in TEXT:
            assert isinstance(record[key], str) and record[key], (name, key)
        assert record["batch"] == int(name.rsplit("-b", 1)[1]) and record["resolution"] == 64
        assert record["images_per_s"] == pytest.approx(record["batch"] / record["s_per_step"])
        assert record["mfu"] == pytest.approx(record["model_flops"] / record["s_per_step"] / record["peak_flops_per_s"])
        assert record["trained_params"] < record["unet_params"] if record["training"] == "lora" else (
            record["trained_params"] == record["unet_params"])
    jax_full, jax_lora = by_row["jax-sd15-full-b8"], by_row["jax-sdxl-lora-b1"]
    assert jax_full["attention"] == "auto" and jax_full["attention_resolved"] == "chunked"  # auto on the CPU
    assert jax_full["compile_s"] > 0 and jax_full["peak_source"].startswith("measured")
    assert jax_lora["lora_rank"] == 4 and jax_lora["remat"] is None
    torch_lora = by_row["torch-sdxl-lora-b1"]
    if peft:
        assert torch_lora["status"] == "ok" and torch_lora["compile_s"] is None
        assert torch_lora["model_flops"] == jax_lora["model_flops"]  # one FLOP count per shape, training and batch
    recipe = by_row["torch-sd15-12gb-b1"]  # 8-bit Adam: CUDA only, so a smoke run skips it and says why
    assert recipe["status"] == "skipped" and "CUDA" in recipe["reason"]


def test_a_row_in_its_own_process_reports_back() -> None:
    """--isolate row (the default off --smoke): the child's record comes back through its stdout."""
    pytest.importorskip("diffusers")
    proc, records = bench("--isolate", "row", "--rows", "torch-sd15-16gb-b1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = records
    assert record["row"] == "torch-sd15-16gb-b1" and record["status"] == "skipped" and "carry" not in record


@pytest.fixture(scope="module")
def bd():
    """The script as a module; scripts/ stays on sys.path while the tests run (it imports bench_unet)."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_device

    yield bench_device
    sys.path.remove(str(SCRIPTS))


def test_the_rows_are_the_issues_grid_on_both_backends(bd) -> None:
    rows = bd.select_rows("both", None)
    assert len(rows) == 18 and rows[0].name == "jax-sd15-full-b8" and rows[1].name == "torch-sd15-full-b8"
    grid = {(r.model, r.training, r.batch, r.remat) for r in rows if r.recipe is None}
    assert grid == {("sd15", t, b, False) for t in ("full", "lora") for b in (1, 8)} | {
        ("sdxl", "full", 1, True), ("sdxl", "full", 4, True), ("sdxl", "lora", 1, False), ("sdxl", "lora", 4, False)}
    assert {r.backend for r in bd.select_rows("jax", None)} == {"jax"}
    assert [r.name for r in bd.select_rows("torch", "jax-sd15-full-b1,torch-sd15-16gb-b1")] == ["torch-sd15-16gb-b1"]
    with pytest.raises(SystemExit, match="unknown row"):
        bd.select_rows("both", "jax-sd15-full-b3")


def test_published_peaks_by_device_kind(bd) -> None:
    assert bd.published_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert bd.published_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert bd.published_peak("NVIDIA H200")[0] == 989e12
    assert bd.published_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bd.published_peak("NVIDIA L4")[0] == 121e12 and bd.published_peak("NVIDIA L40S") is None
    assert bd.published_peak("TPU v5 lite")[0] == 197e12 and bd.published_peak("TPU v5p")[0] == 459e12
    assert bd.published_peak("TPU v4")[0] == 275e12 and bd.published_peak("TPU v6 lite")[0] == 918e12
    assert bd.published_peak("NVIDIA H100 NVL") is None and bd.published_peak("cpu") is None


def test_the_budget_skips_rows_that_cannot_start(bd) -> None:
    rows, ran, seen = bd.select_rows("both", "jax-sd15-full-b1,torch-sd15-full-b1"), [], []
    runner = lambda row, deadline: ran.append(row.name) or {"row": row.name, "status": "ok"}  # noqa: E731
    bd.run_all(rows, runner, budget_s=100.0, min_row_s=0.0, emit=seen.append)
    assert ran == ["jax-sd15-full-b1", "torch-sd15-full-b1"] and [r["status"] for r in seen] == ["ok", "ok"]
    ran.clear()
    records = bd.run_all(rows, runner, budget_s=10.0, min_row_s=30.0, emit=lambda r: None)
    assert ran == [] and all(r["status"] == "skipped" and "budget spent" in r["reason"] for r in records)


def test_an_out_of_memory_row_is_a_record_not_a_crash(bd, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB")

    monkeypatch.setattr(bd, "run_jax_row", oom)
    record = bd.run_row(bd.ROWS["jax-sdxl-lora-b4"], bd.parse_args(["--smoke"]), deadline=0.0, cache={})
    assert record["status"] == "oom" and "81.2GiB" in record["error"] and record["batch"] == 4
