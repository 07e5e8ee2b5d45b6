#!/usr/bin/env python
"""LoRA training side by side: diffusers' train_dreambooth_lora.py, jaxbooth's LoRA on both backends, full fine-tunes.

Rows (as ../shared/peer-bench/speed.py names and builds them, rank-4 LoRA on the UNet):
``diffusers-lora`` (diffusers' script in the peer harness's venv), ``jaxbooth-jax-lora``,
``jaxbooth-torch-lora``, ``jaxbooth-jax`` and ``jaxbooth-torch`` (full fine-tunes). Every row
trains the same pipeline on the same images, interleaved in one run; each launch runs under
``/usr/bin/time -f %M`` (speed.py's ``run``). Steady-state s/step = (T(N2) - T(N1)) / (N2 - N1),
start-up = T(N1) - N1 * s/step, as speed.py computes them; output size = the LoRA file's bytes
against the full fine-tune's trained ``unet/`` folder. Prints one JSON line on stdout (ratios
against diffusers' LoRA script, and LoRA against the full fine-tune per backend) and a human
table on stderr.

    python scripts/bench_lora.py                      # small model, N1=5 N2=25, 1 rep, every row
    python scripts/bench_lora.py --reps 2 --rows diffusers-lora,jaxbooth-jax-lora
    python scripts/bench_lora.py --smoke              # tiny model, 1 -> 2 steps, jaxbooth rows only
    python scripts/bench_lora.py --family sdxl        # the same rows on the SDXL-shaped pipe-sdxl-SIZE (row-sdxl)

With ``--family sdxl`` every row name carries ``-sdxl`` (speed.py's ``diffusers-lora-sdxl``,
``jaxbooth-jax-lora-sdxl``, ...), the jaxbooth LoRA rows run ``train_dreambooth_lora_sdxl.py`` and the
pipeline is ``pipe-sdxl-SIZE`` (built with ``jaxbooth tiny-model --family sdxl`` off the harness).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
ROWS = ("diffusers-lora", "jaxbooth-jax-lora", "jaxbooth-torch-lora", "jaxbooth-jax", "jaxbooth-torch")
PEER_ROWS = ("diffusers-lora",)
LORA_ROWS = {"diffusers-lora": "diffusers", "jaxbooth-jax-lora": "jax", "jaxbooth-torch-lora": "torch"}
FULL_ROWS = {"jaxbooth-jax": "jax", "jaxbooth-torch": "torch"}
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' script and jaxbooth's LoRA runs write
RESOLUTION = {"tiny": 64, "small": 128}  # speed.py's RES
TARGETS = {"jax": 1.5, "torch": 1.2}  # issue 17: s/step speed-up over diffusers' LoRA script, per backend

Row = Callable[[int, str], list[str]]
FAMILY_SUFFIX = {"sd": "", "sdxl": "-sdxl"}
LORA_SCRIPT = {"sd": "train_dreambooth_lora.py", "sdxl": "train_dreambooth_lora_sdxl.py"}


def pipe_name(size: str, family: str) -> str:
    """speed.py's folder names: pipe-small, pipe-sdxl-small."""
    return f"pipe-{size}" if family == "sd" else f"pipe-sdxl-{size}"


def base_row(name: str) -> str:
    """The row's SD name, what LORA_ROWS / FULL_ROWS / PEER_ROWS hold (``jaxbooth-jax-lora-sdxl`` -> ``...-lora``)."""
    return name.removesuffix(FAMILY_SUFFIX["sdxl"])


# ---------------------------------------------------------------- the rows: speed.py's, else the same flags here


def load_speed(peer_dir: Path, bench: Path, jaxbooth: str):
    """../shared/peer-bench/speed.py pointed at ``bench`` and ``jaxbooth`` (its globals are read at call time)."""
    path = peer_dir / "speed.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("peer_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.B = str(bench)
    module.JB_BIN = jaxbooth
    return module


def builtin_rows(bench: Path, jaxbooth: str, size: str, family: str = "sd") -> dict[str, Row]:
    """The jaxbooth rows with speed.py's flags, for a machine without the peer harness (or rows it lacks)."""
    def common(n: int, out: str) -> list[str]:
        return [f"--pretrained_model_name_or_path={bench}/{pipe_name(size, family)}",
                f"--instance_data_dir={bench}/instance",
                "--instance_prompt=a photo of sks cat", f"--resolution={RESOLUTION[size]}", "--train_batch_size=1",
                "--learning_rate=5e-6", f"--max_train_steps={n}", f"--output_dir={out}"]

    lora, suffix = [LORA_SCRIPT[family]], FAMILY_SUFFIX[family]
    return {
        f"jaxbooth-jax-lora{suffix}": lambda n, o: [jaxbooth, "train", *lora, "--backend=jax", "--rank=4",
                                                    *common(n, o)],
        f"jaxbooth-torch-lora{suffix}": lambda n, o: [jaxbooth, "train", *lora, "--backend=torch", "--rank=4",
                                                      *common(n, o)],
        f"jaxbooth-jax{suffix}": lambda n, o: [jaxbooth, "train", "--backend=jax", *common(n, o)],
        f"jaxbooth-torch{suffix}": lambda n, o: [jaxbooth, "train", "--backend=torch", *common(n, o)],
    }


def builtin_run(cmd: list[str]) -> tuple[float, float, int, str, bool]:
    """speed.py's ``run``: wall time, peak RSS (GB) from /usr/bin/time, exit status, stderr tail."""
    timer = ["/usr/bin/time", "-f", "PEAK_KB %M"] if Path("/usr/bin/time").exists() else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    start = time.time()
    proc = subprocess.run([*timer, *cmd], env=env, capture_output=True, text=True)
    peak = re.findall(r"PEAK_KB (\d+)", proc.stderr)
    return time.time() - start, int(peak[-1]) / 1e6 if peak else float("nan"), proc.returncode, proc.stderr[-600:], True


# ---------------------------------------------------------------- one launch


def folder_bytes(path: Path) -> int | None:
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def logged_s_per_step(out: Path) -> float | None:
    """From jaxbooth's metrics.jsonl (a record every log_every_steps): the windows after the first, so no start-up."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "time" in r]
    if len(records) < 2 or records[-1]["step"] <= records[0]["step"]:
        return None
    return (records[-1]["time"] - records[0]["time"]) / (records[-1]["step"] - records[0]["step"])


def launch(run: Callable, make: Row, name: str, steps: int, out: Path) -> dict:
    """One trainer process: wall, peak RSS, exit status, and what it wrote (LoRA file, unet/ folder)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = make(steps, str(out))
    wall, peak, rc, tail, _ = run(cmd)
    lines = [ln for ln in tail.strip().splitlines() if not ln.startswith(("PEAK_KB", "Command exited"))]
    result = {"row": name, "steps": steps, "wall_s": wall, "peak_rss_gb": None if peak != peak else peak, "rc": rc,
              "lora_file_bytes": (out / LORA_FILE).stat().st_size if (out / LORA_FILE).exists() else None,
              "unet_bytes": folder_bytes(out / "unet"), "output_bytes": folder_bytes(out),
              "s_per_step_logged": logged_s_per_step(out)}
    if rc != 0:
        result["error"] = "\n".join(lines[-8:])
        result["cmd"] = cmd
    elif base_row(name) in LORA_ROWS and result["lora_file_bytes"] is None:
        result["error"] = f"exit 0 but no {LORA_FILE} in {out} (did it train LoRA?)"
    elif base_row(name) in FULL_ROWS and result["unet_bytes"] is None:
        result["error"] = f"exit 0 but no unet/ in {out}"
    print(f"  {name:20} {steps:4d} steps {wall:8.1f} s  peak {fmt(result['peak_rss_gb'], '.2f')} GB  rc {rc}"
          + (f"  ERROR {result['error'].splitlines()[-1][:100]}" if result.get("error") else ""),
          file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------- set-up


def default_jaxbooth() -> str:
    found = os.environ.get("JAXBOOTH_BIN") or shutil.which("jaxbooth")
    if not found and (Path(sys.executable).parent / "jaxbooth").exists():
        found = str(Path(sys.executable).parent / "jaxbooth")
    if not found:
        sys.exit("bench_lora.py: no jaxbooth console script found; pass --jaxbooth or set JAXBOOTH_BIN")
    return found


def prepare_bench(args, work: Path) -> tuple[Path, bool]:
    """The folder the rows read ``pipe-SIZE`` and ``instance`` from: the peer harness's, else one built in ``work``.

    Returns (folder, whether it is the peer harness's: only then can the diffusers row run).
    """
    bench = Path(os.environ["JB_BENCH"]) if os.environ.get("JB_BENCH") and not args.smoke else None
    name = pipe_name(args.size, args.family)
    if bench and not args.model_dir and not args.instance_dir and (bench / name / "model_index.json"
                                                                   ).exists() and (bench / "instance").is_dir():
        return bench, True
    own = work / "bench"
    own.mkdir(parents=True, exist_ok=True)
    pipe, images = own / name, own / "instance"
    for link in (pipe, images):
        if link.is_symlink():
            link.unlink()
    if args.model_dir:
        pipe.symlink_to(Path(args.model_dir).absolute(), target_is_directory=True)
    elif not (pipe / "model_index.json").exists():  # kept between runs in a --work-dir
        print(f"building the {args.size} pipeline in {pipe}", file=sys.stderr, flush=True)
        subprocess.run([args.jaxbooth, "tiny-model", str(pipe), "--size", args.size, "--family", args.family],
                       check=True,
                       stdout=subprocess.DEVNULL)
    if args.instance_dir:
        source = Path(args.instance_dir).absolute()
    else:
        from jaxbooth.data import example_instance_dir

        source = Path(example_instance_dir()).absolute()
    images.symlink_to(source, target_is_directory=True)
    return own, False


def select_rows(args, bench: Path, is_harness: bool) -> tuple[dict[str, Row], Callable, str, dict[str, str]]:
    """The chosen rows' command builders and the launcher, from speed.py when it is there; skipped rows with why."""
    speed = load_speed(Path(args.peer_dir), bench, args.jaxbooth)
    table = builtin_rows(bench, args.jaxbooth, args.size, args.family)  # rows speed.py lacks (jaxbooth-torch-sdxl)
    if speed is not None:
        table, run, source = {**table, **speed.trainers(args.size)}, speed.run, str(Path(args.peer_dir) / "speed.py")
    else:
        run, source = builtin_run, "builtin"
    chosen, skipped = {}, {}
    for name in args.rows:
        if name not in table:
            skipped[name] = f"{args.peer_dir}/speed.py not found (the peer harness)"
        elif base_row(name) in PEER_ROWS and not (is_harness and (bench / "venv-new" / "bin" / "accelerate").exists()):
            skipped[name] = "peer harness not set up (JB_BENCH with venv-new, pipe-SIZE, instance)"
        else:
            chosen[name] = table[name]
    return chosen, run, source, skipped


def versions(bench: Path) -> dict:
    sys.path.insert(0, str(SCRIPTS))
    from bench_unet import cpu_name

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "peft"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    peers = (p.name.removesuffix(".dist-info").split("-", 1)
             for p in (bench / "venv-new").glob("lib/python*/site-packages/*.dist-info"))
    info["peer_versions"] = {name: version for name, version in sorted(peers)
                             if name in ("diffusers", "peft", "torch", "accelerate", "transformers")}
    return info


# ---------------------------------------------------------------- measurement and summary


def measure(args, work: Path) -> dict:
    bench, is_harness = prepare_bench(args, work)
    rows, run, source, skipped = select_rows(args, bench, is_harness)
    # speed.py launches with os.environ: keep jaxbooth's persistent compilation cache off so the N2 run pays the
    # compile the N1 run paid (and the peers pay), and out of the user's ~/.cache
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    os.environ["JAXBOOTH_CACHE"] = str(work / "jaxbooth-cache")
    record = {"bench": "lora", **versions(bench),
              "config": {"size": args.size, "family": args.family, "resolution": RESOLUTION[args.size], "batch": 1,
                         "dtype": "float32",
                         "rank": 4, "n1": args.n1, "n2": args.n2, "reps": args.reps, "bench_dir": str(bench),
                         "peer_harness": is_harness, "rows_source": source, "jaxbooth": args.jaxbooth,
                         "commands": {name: make(args.n1, "OUT") for name, make in rows.items()}},
              "skipped": skipped, "loadavg_start": list(os.getloadavg())}
    runs = []
    # interleaved: every rep runs every row (N1 then N2, as speed.py does), so drifting load lands on all rows
    for rep in range(args.reps):
        for name, make in rows.items():
            for steps in (args.n1, args.n2):
                runs.append({**launch(run, make, name, steps, work / f"out-{name}-{steps}"), "rep": rep})
    record["runs"] = runs
    record["loadavg_end"] = list(os.getloadavg())
    record["rows"] = {name: summarize_row(args, [r for r in runs if r["row"] == name]) for name in rows}
    record.update(ratios(record["rows"], FAMILY_SUFFIX[args.family]))
    return record


def summarize_row(args, runs: list[dict]) -> dict:
    per_rep = []
    for rep in sorted({r["rep"] for r in runs}):
        r1, r2 = (next(r for r in runs if r["rep"] == rep and r["steps"] == n) for n in (args.n1, args.n2))
        step = (r2["wall_s"] - r1["wall_s"]) / (args.n2 - args.n1)
        per_rep.append({"s_per_step": step, "startup_s": r1["wall_s"] - args.n1 * step})
    ok = all(not r.get("error") for r in runs)
    peaks = [r["peak_rss_gb"] for r in runs if r["peak_rss_gb"] is not None]
    logged = [r["s_per_step_logged"] for r in runs if r["steps"] == args.n2 and r["s_per_step_logged"] is not None]
    last = runs[-1]
    return {"ok": ok, "per_rep": per_rep,
            "s_per_step": statistics.median(p["s_per_step"] for p in per_rep) if ok else None,
            "s_per_step_range": [min(p["s_per_step"] for p in per_rep), max(p["s_per_step"] for p in per_rep)],
            "startup_s": statistics.median(p["startup_s"] for p in per_rep) if ok else None,
            "s_per_step_logged": statistics.median(logged) if logged else None,
            "peak_rss_gb": max(peaks) if peaks else None,
            "lora_file_bytes": last["lora_file_bytes"], "unet_bytes": last["unet_bytes"],
            "output_bytes": last["output_bytes"],
            "errors": [r["error"] for r in runs if r.get("error")]}


def div(a, b):
    return a / b if a is not None and b else None


def ratios(rows: dict, suffix: str = "") -> dict:
    """Against diffusers' LoRA script (diffusers / jaxbooth: > 1 means jaxbooth is faster or smaller), and LoRA
    against the full fine-tune per backend; ``suffix`` "-sdxl" compares the SDXL rows."""
    out = {"vs_diffusers_lora": {}, "lora_vs_full": {}, "targets": {}}
    peer = rows.get("diffusers-lora" + suffix) or {}
    for name, backend in LORA_ROWS.items():
        ours = rows.get(name + suffix) or {}
        if backend == "diffusers" or not ours:
            continue
        if peer.get("ok") and ours.get("ok"):
            speedup = div(peer["s_per_step"], ours["s_per_step"])
            memory = div(peer["peak_rss_gb"], ours["peak_rss_gb"])
            out["vs_diffusers_lora"][backend] = {
                "s_per_step": ours["s_per_step"], "s_per_step_diffusers": peer["s_per_step"],
                "peak_gb": ours["peak_rss_gb"], "peak_gb_diffusers": peer["peak_rss_gb"],
                "speedup": speedup, "peak_ratio": memory,
                # jaxbooth's own logged step time (no start-up in it) against diffusers' two-launch figure
                "speedup_vs_logged": div(peer["s_per_step"], ours.get("s_per_step_logged")),
                "startup_ratio": div(peer["startup_s"], ours["startup_s"]),
                "lora_file_ratio": div(peer["lora_file_bytes"], ours["lora_file_bytes"])}
            out["targets"][backend] = {"speedup_min": TARGETS[backend], "speedup_met": speedup >= TARGETS[backend],
                                       "peak_met": memory is not None and memory >= 1.0}
        full = rows.get(f"jaxbooth-{backend}{suffix}") or {}
        if ours.get("ok") and full.get("ok"):
            out["lora_vs_full"][backend] = {
                "s_per_step_lora": ours["s_per_step"], "s_per_step_full": full["s_per_step"],
                "speedup": div(full["s_per_step"], ours["s_per_step"]),
                # from the trainers' own logged step times: no start-up or compile jitter in them
                "speedup_logged": div(full.get("s_per_step_logged"), ours.get("s_per_step_logged")),
                "peak_gb_lora": ours["peak_rss_gb"], "peak_gb_full": full["peak_rss_gb"],
                "peak_ratio": div(ours["peak_rss_gb"], full["peak_rss_gb"]),
                "lora_file_bytes": ours["lora_file_bytes"], "unet_bytes_full": full["unet_bytes"],
                "size_ratio": div(ours["lora_file_bytes"], full["unet_bytes"])}
    return out


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(record: dict, stream) -> None:
    c = record["config"]
    print(f"LoRA (rank 4, UNet) vs full fine-tune, {c.get('family', 'sd')} size={c['size']} {c['resolution']} px, "
          "batch 1, fp32, "
          f"{record['cpu']} ({record['cpu_count']} cores), steps {c['n1']}->{c['n2']}, {c['reps']} rep(s), "
          f"load {record['loadavg_start'][0]:.1f} -> {record['loadavg_end'][0]:.1f}", file=stream)
    print(f"  {'row':20} {'s/step':>8} {'logged':>8} {'start-up':>9} {'peak GB':>8} {'LoRA file':>10} "
          f"{'unet/':>10}  range / note", file=stream)
    for name, row in record["rows"].items():
        lo, hi = row["s_per_step_range"]
        note = f"{lo:.3f}-{hi:.3f}" + ("  " + row["errors"][-1].splitlines()[-1][:80] if row["errors"] else "")
        if lo <= 0:
            note += "  (N2 run faster than N1: start-up jitter exceeds the step gap, raise --n2)"
        print(f"  {name:20} {fmt(row['s_per_step']):>8} {fmt(row['s_per_step_logged']):>8} "
              f"{fmt(row['startup_s'], '.1f'):>9} {fmt(row['peak_rss_gb'], '.2f'):>8} "
              f"{fmt(row['lora_file_bytes'], ',d'):>10} {fmt(row['unet_bytes'], ',d'):>10}  {note}", file=stream)
    for name, why in record["skipped"].items():
        print(f"  {name:20} skipped: {why}", file=stream)
    suffix = FAMILY_SUFFIX[c.get("family", "sd")]
    for backend, r in record["vs_diffusers_lora"].items():
        t = record["targets"][backend]
        print(f"  jaxbooth-{backend}-lora{suffix} vs diffusers-lora{suffix}: {fmt(r['speedup'], '.2f')}x faster per "
              "step (target "
              f">= {t['speedup_min']}: {'met' if t['speedup_met'] else 'NOT met'}); peak {fmt(r['peak_gb'], '.2f')} vs "
              f"{fmt(r['peak_gb_diffusers'], '.2f')} GB (no more: {'met' if t['peak_met'] else 'NOT met'}); "
              f"start-up {fmt(r['startup_ratio'], '.2f')}x shorter", file=stream)
    for backend, r in record["lora_vs_full"].items():
        print(f"  {backend}: LoRA vs full: {fmt(r['speedup'], '.2f')}x faster per step (logged: "
              f"{fmt(r['speedup_logged'], '.2f')}x), peak "
              f"{fmt(r['peak_ratio'], '.2f')} of full, output {fmt(r['size_ratio'], '.4f')} of unet/ "
              f"({fmt(r['lora_file_bytes'], ',d')} vs {fmt(r['unet_bytes_full'], ',d')} bytes)", file=stream)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default=None, help="default: small (tiny with --smoke)")
    parser.add_argument("--family", choices=tuple(FAMILY_SUFFIX), default="sd",
                        help="sd (pipe-SIZE) or sdxl (pipe-sdxl-SIZE, rows named ROW-sdxl)")
    parser.add_argument("--n1", type=int, default=None, help="steps of the short run (default 5; 1 with --smoke)")
    parser.add_argument("--n2", type=int, default=None, help="steps of the long run (default 25; 2 with --smoke)")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions of every row; median")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated, from {','.join(ROWS)} (default: all; the jaxbooth ones with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 1 -> 2 steps, a pipeline built here (not the harness's), no peers")
    parser.add_argument("--model-dir", dest="model_dir", default=None,
                        help="pipeline folder (default: $JB_BENCH/pipe-SIZE, else built with jaxbooth tiny-model)")
    parser.add_argument("--instance-dir", dest="instance_dir", default=None,
                        help="images (default: $JB_BENCH/instance, else jaxbooth's bundled examples)")
    parser.add_argument("--work-dir", dest="work_dir", default=None,
                        help="outputs and caches (default: a temporary folder, removed after)")
    parser.add_argument("--jaxbooth", default=None, help="jaxbooth console script (default: $JAXBOOTH_BIN, PATH)")
    parser.add_argument("--peer-dir", dest="peer_dir", default=str(REPO.parent / "shared" / "peer-bench"))
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if args.smoke else "small")
    args.n1 = args.n1 if args.n1 is not None else (1 if args.smoke else 5)
    args.n2 = args.n2 if args.n2 is not None else (2 if args.smoke else 25)
    if args.n2 <= args.n1 or args.n1 < 1:
        parser.error("need 1 <= --n1 < --n2")
    suffix = FAMILY_SUFFIX[args.family]
    names = [row + suffix for row in ROWS]
    default_rows = [row + suffix for row in ROWS if row not in PEER_ROWS] if args.smoke else names
    args.rows = args.rows.split(",") if args.rows else default_rows
    unknown = [r for r in args.rows if r not in names]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(names)}")
    args.jaxbooth = args.jaxbooth or default_jaxbooth()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).absolute()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-lora-")
        work = Path(tmp.name)
    try:
        record = measure(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(record), flush=True)
    print_table(record, sys.stderr)
    return 0 if record["rows"] and all(row["ok"] for row in record["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
