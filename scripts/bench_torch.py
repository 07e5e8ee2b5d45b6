"""Benchmark the torch backend: train N steps, print one JSON line.

    python scripts/bench_torch.py [--size tiny|small] [--steps 20] [-- extra jaxbooth train flags]

The line holds the device, torch/diffusers versions, the flags, setup and loop wall time,
steady-state steps/s (the first two logged steps left out) and peak memory (CUDA allocator
peak on GPU, max RSS on CPU). Compare numbers only from the same device kind.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]

    import diffusers
    import torch

    from jaxbooth.cli import main as cli_main
    from jaxbooth.tiny import RESOLUTION, builtin_tiny_model

    model = builtin_tiny_model(args.size)
    flags = [f"--resolution={RESOLUTION[args.size]}", f"--train_batch_size={args.batch}",
             f"--max_train_steps={args.steps}", "--checkpointing_steps=100000", "--report_to=none",
             "--log_every_steps=1", "--seed=0", *extra]
    with tempfile.TemporaryDirectory(prefix="jaxbooth-bench-") as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        code = cli_main(["train", "--backend=torch", f"--pretrained_model_name_or_path={model}",
                         f"--output_dir={out}", *flags])
        total = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[2:] or records
    loop_seconds = steady[-1]["time"] - steady[0]["time"] if len(steady) > 1 else float("nan")
    cuda = torch.cuda.is_available()
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads(),
        "model": args.size, "flags": flags, "exit_code": code, "total_seconds": round(total, 2),
        "steps_per_sec": round((len(steady) - 1) / loop_seconds, 3) if len(steady) > 1 else None,
        "final_loss": records[-1]["train/loss"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
