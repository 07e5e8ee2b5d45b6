#!/usr/bin/env python
"""`jaxbooth train --backend=jax` as whole processes: steady-state s/step, start-up cold and warm, peak RSS, MFU.

Each trainer launch runs under ``/usr/bin/time -f %M`` (peak RSS). Two step counts N1 < N2
with an empty compilation cache give the steady-state cost (T2 - T1) / (N2 - N1) and the
cold time to first step T1 - N1 * step, as ../shared/peer-bench/speed.py computes them; a
relaunch of N1 steps on the N1 run's (now warm) persistent compilation cache gives the warm
time to first step. The trainer's own "compiled the train step in X s" line is reported too.

MFU = model FLOPs per train step (XLA cost analysis of the trainer's compiled step, built
in-process with ``jaxbooth.jax_backend.train``'s functions; on failure the UNet fwd+bwd cost)
/ step time / a measured f32 matmul rate (jnp.dot, 2048^2, median) on this machine.

``--peer`` also runs the peer harness (diffusers' Flax DreamBooth script and jaxbooth, side
by side) and includes its table. Prints one JSON line on stdout and a human table on stderr.

    python scripts/bench_train.py                       # small model, N1=5 N2=25, 1 rep
    python scripts/bench_train.py --n1 5 --n2 25 --peer # plus ../shared/peer-bench/speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
PROMPT = "a photo of sks cat"  # the peer harness's prompt
COMPILED_RE = re.compile(r"compiled the train step in ([0-9.]+)\s*s")
PEAK_RE = re.compile(r"PEAK_KB (\d+)")
STEP_RE = re.compile(r"step (\d+)/\d+ .* ([0-9.]+) steps/s")


def default_bench_dir() -> Path | None:
    root = os.environ.get("JB_BENCH")
    return Path(root) if root else None


def default_jaxbooth() -> list[str]:
    found = os.environ.get("JAXBOOTH_BIN") or shutil.which("jaxbooth")
    if not found and (Path(sys.executable).parent / "jaxbooth").exists():
        found = str(Path(sys.executable).parent / "jaxbooth")
    return [found] if found else [sys.executable, "-m", "jaxbooth"]


def resolve_model_dir(args, work: Path) -> Path:
    """--model_dir, else the peer harness's pipe-<size> (same weights as the peers), else build one."""
    if args.model_dir:
        return Path(args.model_dir)
    bench = default_bench_dir()
    if bench and (bench / f"pipe-{args.size}" / "model_index.json").exists():
        return bench / f"pipe-{args.size}"
    path = work / f"pipe-{args.size}"
    if not (path / "model_index.json").exists():
        print(f"building the {args.size} pipeline in {path}", file=sys.stderr)
        subprocess.run([*args.jaxbooth, "tiny-model", str(path), "--size", args.size], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def resolve_instance_dir(args) -> Path:
    if args.instance_dir:
        return Path(args.instance_dir)
    bench = default_bench_dir()
    if bench and (bench / "instance").is_dir():
        return bench / "instance"
    from jaxbooth.data import example_instance_dir

    return example_instance_dir()


def train_args(args, model_dir: Path, instance_dir: Path, steps: int, out: Path, cache: Path) -> list[str]:
    """The peer harness's flags (speed.py ``common``) plus a compilation cache folder and any --extra."""
    return [f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={instance_dir}",
            f"--instance_prompt={PROMPT}", f"--resolution={args.resolution}", "--train_batch_size=1",
            "--learning_rate=5e-6", f"--max_train_steps={steps}", f"--output_dir={out}",
            f"--compilation_cache_dir={cache}", *args.extra]


def launch(args, model_dir: Path, instance_dir: Path, steps: int, work: Path, tag: str, cache: Path,
           fresh_cache: bool) -> dict:
    """One trainer process under /usr/bin/time; wall time, peak RSS, the compile line, exit status."""
    if fresh_cache and cache.exists():
        shutil.rmtree(cache)
    out = work / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*args.jaxbooth, "train", "--backend=jax",
           *train_args(args, model_dir, instance_dir, steps, out, cache)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", JAXBOOTH_CACHE=str(work / "jaxbooth-cache"))
    timer = ["/usr/bin/time", "-f", "PEAK_KB %M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run([*timer, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = PEAK_RE.findall(proc.stderr)
    compiled = COMPILED_RE.findall(proc.stderr)
    # the trainer's progress lines (every log_every_steps): windows after the first hold no start-up at all
    logged = [(int(step), float(rate)) for step, rate in STEP_RE.findall(proc.stderr)]
    windows = [(b[0] - a[0], 1 / b[1]) for a, b in zip(logged[:-1], logged[1:], strict=True) if b[1] > 0]
    run = {"tag": tag, "steps": steps, "wall_s": wall, "rc": proc.returncode,
           "peak_rss_gb": int(peak[-1]) / 1e6 if peak else None,
           "compile_s": float(compiled[-1]) if compiled else None,
           "logged_s_per_step": (sum(n * t for n, t in windows) / sum(n for n, _ in windows)) if windows else None}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("PEAK_KB", "Command exited"))]
        run["error"] = "\n".join(lines[-15:])
        run["cmd"] = cmd
    print(f"  {tag}: {steps} steps, {wall:.1f} s, rc {proc.returncode}, compile {run['compile_s']} s, "
          f"peak {run['peak_rss_gb']} GB", file=sys.stderr, flush=True)
    return run


def train_step_cost(args, model_dir: Path, instance_dir: Path, cache: Path, work: Path) -> dict:
    """XLA cost of the trainer's compiled step, built with train.py's own phase functions.

    Uses the warm compilation cache the trainer runs left, so this is normally a cache hit.
    With ``--inproc-steps K`` the compiled step is also timed against the bare UNet fwd+bwd
    (:func:`step_vs_unet`).
    """
    import jax

    from jaxbooth import data, run_defaults
    from jaxbooth import spec as spec_lib
    from jaxbooth.jax_backend import caches as caches_lib
    from jaxbooth.jax_backend import mesh as mesh_lib
    from jaxbooth.jax_backend import train as T
    from jaxbooth.jax_backend.train_step import make_train_step

    argv = train_args(args, model_dir, instance_dir, args.n1, work / "out-cost", cache)
    spec = run_defaults.fill_defaults(spec_lib.load_spec(argv))
    try:  # the matmul peak already compiled with no cache folder set; let the cache pick the folder up
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    T.configure_jax(spec)
    mesh = mesh_lib.make_mesh(spec_lib.mesh_shape(spec, jax.device_count()))
    models = T.load_for_training(spec)
    run = T.prepare_inputs(spec, models)
    caches = caches_lib.build_caches(spec, models, run.dataset, run.seed)
    params_host, lora_base = T.initial_params(spec, models, run.seed)
    if lora_base is not None:
        raise SystemExit("bench_train.py times full fine-tunes; time LoRA with scripts/bench_lora.py")
    tx, lr_schedule = T.run_optimizer(run, models)
    state, shardings = T.init_state(params_host, tx, mesh, run.seed)
    step_fn = make_train_step(
        unet_apply=models.unet.apply,
        text_apply=T.step_text_apply(spec, models),
        tx=tx, lr_schedule=lr_schedule, tables=models.noise_schedule.as_tables(),
        options=T.loss_options(spec, models), gradient_accumulation_steps=spec.optim.gradient_accumulation_steps)
    iterator = data.BatchIterator(run.dataset, resolution=spec.data.resolution,
                                  batch_size=T.global_batch_size(spec), seed=run.seed,
                                  center_crop=spec.data.center_crop, random_flip=spec.data.random_flip)
    batch = caches_lib.global_rows(iterator, 0, 0, {prompt: i for i, prompt in enumerate(caches.prompts)},
                                   caches.latent_index)
    frozen = jax.device_put(caches.frozen, T.frozen_shardings(caches.frozen, mesh))
    compiled, seconds, batch_shardings = T.compile_step(step_fn, state, shardings, frozen, batch, mesh)
    from bench_unet import xla_cost, xla_memory

    result = {"flops_source": "train_step", "in_process_compile_s": seconds, **xla_cost(compiled),
              **xla_memory(compiled)}
    if args.inproc_steps:
        step_args = (state, frozen, T.put_batch(batch, batch_shardings))
        result["step_vs_unet"] = step_vs_unet(args, compiled, step_args, params_host["unet"])
    return result


def step_vs_unet(args, compiled, step_args, unet_params) -> dict:
    """The trainer's compiled step against the bare UNet fwd+bwd (same params), interleaved, each timed to
    completion: how much of a step is not the UNet (optimizer, sampling, step overhead)."""
    import jax
    from bench_unet import FlaxUNet, make_inputs, summarize, vae_downsampling

    from jaxbooth import tiny

    unet = FlaxUNet(tiny.unet_config(args.size), 0, params=unet_params)
    latent = args.resolution // vae_downsampling(args.size)
    inputs = make_inputs(1, latent, unet.config.in_channels, unet.config.encoder_hidden_dim, 0)["nhwc"]
    unet.compile(inputs)
    state, frozen, batch = step_args
    step_times, unet_times = [], []
    for i in range(args.inproc_steps + 1):  # the first of each is a warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        unet_elapsed = unet.run(inputs)
        if i:
            step_times.append(elapsed)
            unet_times.append(unet_elapsed)
    step, bare = summarize(step_times, 1, None), summarize(unet_times, 1, None)
    return {"train_step": step, "unet_fwd_bwd": bare, "step_over_unet": step["median_s"] / bare["median_s"],
            "step_over_unet_min": step["min_s"] / bare["min_s"]}


def unet_fwd_bwd_cost(args) -> dict:
    """Fallback: XLA cost of the UNet fwd+bwd alone (batch 1, the pipeline's latent size, 77 tokens)."""
    from bench_unet import FlaxUNet, make_inputs, vae_downsampling, xla_cost

    from jaxbooth import tiny

    unet = FlaxUNet(tiny.unet_config(args.size), 0)
    latent = args.resolution // vae_downsampling(args.size)
    inputs = make_inputs(1, latent, unet.config.in_channels, unet.config.encoder_hidden_dim, 0)["nhwc"]
    info = unet.compile(inputs)
    return {"flops_source": "unet_fwd_bwd", "flops": info.get("flops"), **{k: v for k, v in xla_cost(
        unet.compiled[1]).items() if k != "flops"}}


PHASES = ("configure_jax", "prepare_inputs", "init_state", "compile_step", "run_loop", "trained_params_host",
          "save_pipeline")
MODULE_PHASES = (("loading", "load_models"), ("caches_lib", "build_caches"))  # phases train() calls via a module


def phase_profile(args, model_dir: Path, instance_dir: Path, work: Path) -> dict:
    """Where a cold run's time goes: ``train.train`` in-process with its phase functions timed.

    Each step is timed to completion (``block_until_ready`` on its metrics), which removes
    the loop's async overlap of host work and device work, so the per-step times show the
    first step's extra cost and the steady cost apart. Phases that are not found are skipped.
    """
    import jax

    from jaxbooth import run_defaults
    from jaxbooth import spec as spec_lib
    from jaxbooth.jax_backend import train as T

    cache = work / "xla-phases"
    shutil.rmtree(cache, ignore_errors=True)
    argv = train_args(args, model_dir, instance_dir, args.n1, work / "out-phases", cache)
    spec = run_defaults.fill_defaults(spec_lib.load_spec(argv))
    seconds: dict[str, float] = {}
    step_times: list[float] = []
    originals = {name: getattr(T, name) for name in PHASES if hasattr(T, name)}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                result = fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            if name == "compile_step":
                compiled = result[0]

                def step(*sa, **skw):
                    t0 = time.perf_counter()
                    out = compiled(*sa, **skw)
                    jax.block_until_ready(out[1])
                    step_times.append(time.perf_counter() - t0)
                    return out

                result = (step, *result[1:])
            return result
        return wrapper

    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    for name, fn in originals.items():
        setattr(T, name, timed(name, fn))
    module_originals = {(module, name): getattr(getattr(T, module), name) for module, name in MODULE_PHASES}
    for (module, name), fn in module_originals.items():
        setattr(getattr(T, module), name, timed(name, fn))
    start = time.perf_counter()
    try:
        T.train(spec)
    finally:
        for name, fn in originals.items():
            setattr(T, name, fn)
        for (module, name), fn in module_originals.items():
            setattr(getattr(T, module), name, fn)
    total = time.perf_counter() - start
    return {"steps": args.n1, "total_s": total, "phases_s": seconds,
            "unaccounted_s": total - sum(v for k, v in seconds.items() if k != "run_loop") - seconds.get("run_loop", 0),
            "step_times_s": step_times, "first_step_s": step_times[0] if step_times else None,
            "steady_step_median_s": statistics.median(step_times[1:]) if len(step_times) > 1 else None}


def run_peer(args) -> dict:
    """../shared/peer-bench/speed.py: diffusers' Flax DreamBooth script and jaxbooth-jax, side by side."""
    speed = Path(args.peer_dir) / "speed.py"
    # speed.py launches N1 and N2 with one environment, so jaxbooth's persistent compilation cache
    # ($JAXBOOTH_CACHE/xla) would make the N2 run warm and bias (T2 - T1) / (N2 - N1) low; the peer
    # scripts have no such cache. Both jaxbooth runs are kept cold, like the peers', unless --peer-warm.
    env = dict(os.environ, JAXBOOTH_BIN=args.jaxbooth[0])
    if not args.peer_warm:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if default_bench_dir():
        env["JB_BENCH"] = str(default_bench_dir())
    cmd = [sys.executable, str(speed), args.size, str(args.n1), str(args.n2), "--reps", str(args.peer_reps),
           "--only", args.peer_only]
    print(f"peer: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    result = {"cmd": cmd, "rc": proc.returncode, "wall_s": time.perf_counter() - start,
              "table": proc.stdout.strip().splitlines(), "rows": {}, "speedups": {}}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in args.peer_only.split(","):
            try:
                result["rows"][parts[0]] = {"s_per_step": float(parts[1]), "startup_s": float(parts[2]),
                                            "peak_gb": float(parts[3]), "note": " ".join(parts[4:])}
            except ValueError:
                result["rows"][parts[0]] = {"note": " ".join(parts[1:])}
        match = re.match(r"speedup (\S+) vs (\S+): ([0-9.]+)x", line)
        if match:
            result["speedups"][f"{match[1]} vs {match[2]}"] = float(match[3])
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--n1", type=int, default=5, help="steps of the short run")
    parser.add_argument("--n2", type=int, default=25, help="steps of the long run")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of (cold N1, cold N2, warm N1); median")
    parser.add_argument("--resolution", type=int, default=None, help="default: the size's (small=128)")
    parser.add_argument("--model-dir", dest="model_dir", default=None,
                        help="pipeline folder (default: $JB_BENCH/pipe-SIZE, else built under --work-dir)")
    parser.add_argument("--instance-dir", dest="instance_dir", default=None,
                        help="images (default: $JB_BENCH/instance, else jaxbooth's bundled examples)")
    parser.add_argument("--work-dir", dest="work_dir", default=None,
                        help="outputs and compilation caches (default: a temporary folder, removed after)")
    parser.add_argument("--jaxbooth", default=None, help="jaxbooth console script (default: $JAXBOOTH_BIN, PATH)")
    parser.add_argument("--extra", action="append", default=[],
                        help="extra trainer flag, repeatable, e.g. --extra=--log_every_steps=100")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm-cache relaunch")
    parser.add_argument("--no-mfu", dest="mfu", action="store_false", help="skip FLOPs and the matmul peak")
    parser.add_argument("--inproc-steps", dest="inproc_steps", type=int, default=0,
                        help="also time K steps of the trainer's compiled step against the bare UNet fwd+bwd, "
                        "interleaved in this process (needs the MFU pass; adds a UNet compile)")
    parser.add_argument("--phases", action="store_true",
                        help="also run train() in-process (N1 steps, cold cache) with each phase and step timed")
    parser.add_argument("--peer", action="store_true", help="also run ../shared/peer-bench/speed.py")
    parser.add_argument("--peer-only", dest="peer_only", default="diffusers-flax,jaxbooth-jax")
    parser.add_argument("--peer-warm", dest="peer_warm", action="store_true",
                        help="leave jaxbooth's persistent compilation cache on in the peer runs (biases s/step)")
    parser.add_argument("--peer-reps", dest="peer_reps", type=int, default=1)
    parser.add_argument("--peer-dir", dest="peer_dir", default=str(REPO.parent / "shared" / "peer-bench"))
    args = parser.parse_args(argv)
    if args.n2 <= args.n1:
        parser.error("--n2 must be larger than --n1")
    args.jaxbooth = [args.jaxbooth] if args.jaxbooth else default_jaxbooth()
    return args


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(SCRIPTS))
    from bench_unet import device_info

    from jaxbooth import tiny

    args.resolution = args.resolution or tiny.RESOLUTION[args.size]
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).absolute()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        work = Path(tmp.name)
    try:
        record = measure(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    record = {"bench": "train", **device_info(), **record}
    finish(record)
    print(json.dumps(record), flush=True)
    print_table(record, sys.stderr)
    return 0 if all(r["rc"] == 0 for r in record["runs"]) else 1


def measure(args, work: Path) -> dict:
    from bench_unet import matmul_peak

    model_dir = resolve_model_dir(args, work)
    instance_dir = resolve_instance_dir(args)
    record = {"config": {"size": args.size, "resolution": args.resolution, "batch": 1, "dtype": "float32",
                         "n1": args.n1, "n2": args.n2, "reps": args.reps, "model_dir": str(model_dir),
                         "instance_dir": str(instance_dir), "jaxbooth": args.jaxbooth, "extra": args.extra},
              "loadavg_start": list(os.getloadavg())}
    if args.mfu:  # measured before any trainer runs, while this process is the only one of ours
        record["matmul_peak"] = matmul_peak()
    runs, per_rep = [], []
    for rep in range(args.reps):
        cache_a, cache_b = work / f"xla-{rep}-a", work / f"xla-{rep}-b"
        r1 = launch(args, model_dir, instance_dir, args.n1, work, f"cold-n1-{rep}", cache_a, True)
        r2 = launch(args, model_dir, instance_dir, args.n2, work, f"cold-n2-{rep}", cache_b, True)
        rw = launch(args, model_dir, instance_dir, args.n1, work, f"warm-n1-{rep}", cache_a, False) \
            if args.warm else None
        runs += [r for r in (r1, r2, rw) if r]
        step = (r2["wall_s"] - r1["wall_s"]) / (args.n2 - args.n1)
        # the compile time varies by seconds between launches; taking each run's logged compile out cancels that
        corrected = None
        if r1["compile_s"] is not None and r2["compile_s"] is not None:
            corrected = ((r2["wall_s"] - r2["compile_s"]) - (r1["wall_s"] - r1["compile_s"])) / (args.n2 - args.n1)
        per_rep.append({"s_per_step": step, "s_per_step_compile_corrected": corrected,
                        "s_per_step_logged": r2["logged_s_per_step"],
                        "startup_cold_s": r1["wall_s"] - args.n1 * step,
                        "startup_warm_s": rw["wall_s"] - args.n1 * step if rw else None,
                        "compile_cold_s": median_or_none([r1["compile_s"], r2["compile_s"]]),
                        "compile_warm_s": rw["compile_s"] if rw else None})
    record["runs"] = runs
    record["per_rep"] = per_rep
    ok = all(r["rc"] == 0 for r in runs)
    for key in ("s_per_step", "s_per_step_compile_corrected", "s_per_step_logged", "startup_cold_s",
                "startup_warm_s", "compile_cold_s", "compile_warm_s"):
        record[key] = median_or_none([p[key] for p in per_rep]) if ok else None
    record["peak_rss_gb"] = max((r["peak_rss_gb"] or 0) for r in runs) or None
    if args.mfu and ok:
        try:
            record["step_cost"] = train_step_cost(args, model_dir, instance_dir, work / "xla-0-a", work)
        except Exception as error:  # train.py's phase functions changed: fall back to the UNet alone
            print(f"train-step cost analysis failed ({type(error).__name__}: {error}); using the UNet fwd+bwd",
                  file=sys.stderr)
            record["step_cost"] = {**unet_fwd_bwd_cost(args), "train_step_error": f"{type(error).__name__}: {error}"}
    if args.phases:
        try:
            record["phases"] = phase_profile(args, model_dir, instance_dir, work)
        except Exception as error:
            record["phases"] = {"error": f"{type(error).__name__}: {error}"}
    if args.peer:
        record["peer"] = run_peer(args)
    record["loadavg_end"] = list(os.getloadavg())
    return record


def finish(record: dict) -> None:
    record["steps_per_s"] = 1 / record["s_per_step"] if record.get("s_per_step") else None
    # FLOP/s and MFU from the trainer's own logged step time when there is one (no start-up or compile
    # jitter in it), else from the two-launch difference
    step = record.get("s_per_step_logged") or record.get("s_per_step")
    record["mfu_step_source"] = "s_per_step_logged" if record.get("s_per_step_logged") else "s_per_step"
    flops = (record.get("step_cost") or {}).get("flops")
    peak = (record.get("matmul_peak") or {}).get("flops_per_s")
    if step and flops:
        record["achieved_flops_per_s"] = flops / step
        if peak:
            record["mfu"] = flops / step / peak
        best = (record.get("matmul_peak") or {}).get("best_flops_per_s")
        if best:  # against the best matmul time: the steadier denominator when other work shares the cores
            record["mfu_vs_best_matmul"] = flops / step / best
    peer = record.get("peer", {}).get("rows", {})
    ref = peer.get("diffusers-flax", {})
    ours = peer.get("jaxbooth-jax", {})
    if ref.get("s_per_step") and ours.get("s_per_step"):
        record["peer_ratios"] = {"speedup_vs_diffusers_flax": ref["s_per_step"] / ours["s_per_step"],
                                 "startup_ratio": ref["startup_s"] / ours["startup_s"] if ours["startup_s"] else None,
                                 "peak_ratio": ref["peak_gb"] / ours["peak_gb"] if ours["peak_gb"] else None}


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(record: dict, stream) -> None:
    c = record["config"]
    print(f"jaxbooth train --backend=jax, size={c['size']} {c['resolution']} px, batch 1, fp32, "
          f"{record['device_kind']} x{record['device_count']} ({record['cpu']}, {record['cpu_count']} cores), "
          f"steps {c['n1']}->{c['n2']}, {c['reps']} rep(s), load {record['loadavg_start'][0]:.1f}", file=stream)
    for r in record["runs"]:
        print(f"  {r['tag']:12} {r['steps']:4d} steps {r['wall_s']:8.1f} s  peak {fmt(r['peak_rss_gb'], '.2f')} GB  "
              f"compile {fmt(r['compile_s'], '.1f')} s  rc {r['rc']}", file=stream)
        if r.get("error"):
            print("    " + r["error"].replace("\n", "\n    "), file=stream)
    cost = record.get("step_cost") or {}
    peak = record.get("matmul_peak") or {}
    rows = [("s/step (steady)", fmt(record.get("s_per_step"))),
            ("s/step (compile-corrected)", fmt(record.get("s_per_step_compile_corrected"))),
            ("s/step (trainer's log, N2 run)", fmt(record.get("s_per_step_logged"))),
            ("steps/s", fmt(record.get("steps_per_s"))),
            ("start-up cold s", fmt(record.get("startup_cold_s"), ".1f")),
            ("start-up warm s", fmt(record.get("startup_warm_s"), ".1f")),
            ("compile cold s (trainer)", fmt(record.get("compile_cold_s"), ".1f")),
            ("compile warm s (trainer)", fmt(record.get("compile_warm_s"), ".1f")),
            ("peak RSS GB", fmt(record.get("peak_rss_gb"), ".2f")),
            (f"GFLOP/step ({cost.get('flops_source', '-')})", fmt((cost.get("flops") or 0) / 1e9 or None, ".2f")),
            ("achieved GFLOP/s", fmt((record.get("achieved_flops_per_s") or 0) / 1e9 or None, ".1f")),
            ("matmul peak GFLOP/s", fmt((peak.get("flops_per_s") or 0) / 1e9 or None, ".1f")),
            ("MFU", fmt(record.get("mfu"), ".1%")),
            ("MFU vs best matmul", fmt(record.get("mfu_vs_best_matmul"), ".1%"))]
    for name, value in rows:
        print(f"  {name:28} {value:>10}", file=stream)
    versus = (record.get("step_cost") or {}).get("step_vs_unet")
    if versus:
        print(f"in-process, interleaved: train step {versus['train_step']['median_s']:.3f} s, bare UNet fwd+bwd "
              f"{versus['unet_fwd_bwd']['median_s']:.3f} s: step/UNet {versus['step_over_unet']:.2f} "
              f"(best-of {versus['step_over_unet_min']:.2f})", file=stream)
    if record.get("phases", {}).get("phases_s"):
        ph = record["phases"]
        print(f"phases of an in-process cold run ({ph['steps']} steps, {ph['total_s']:.1f} s; steps timed "
              f"to completion: first {fmt(ph['first_step_s'])} s, then median {fmt(ph['steady_step_median_s'])} s):",
              file=stream)
        for name, value in ph["phases_s"].items():
            print(f"  {name:28} {value:10.1f}", file=stream)
    if "peer" in record:
        print("peer harness (speed.py):", file=stream)
        for line in record["peer"]["table"]:
            print("  " + line, file=stream)
        if record["peer"]["rc"] != 0:
            print("  speed.py failed: " + record["peer"].get("stderr_tail", "")[-500:], file=stream)


if __name__ == "__main__":
    sys.exit(main())
