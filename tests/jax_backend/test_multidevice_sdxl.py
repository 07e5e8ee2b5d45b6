"""Full SDXL sharded over fsdp: the same training as one device, at about a quarter of the bytes per device.

Its own file (not test_multidevice.py's), so pytest-xdist can run it beside those runs on the other worker.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import safetensors.numpy

from tests.jax_backend.test_multidevice import finish, launch, losses, train_args


def test_full_sdxl_sharded_over_fsdp_4_matches_one_device_at_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    """Full SDXL fine-tune, params and optimizer state sharded over fsdp=4 on 4 devices: the same losses and
    trained UNet as one device, and each device holds under 1/3.5 of the params + optimizer bytes (the
    trainer reads that from the arrays' shards and prints it with the sharding table)."""
    from jaxbooth.tiny import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "sdxl", "tiny", seed=0, family="sdxl")
    one, sharded = tmp_path / "one", tmp_path / "fsdp4"
    # 2 steps: the atol below bounds one Adam step's float noise on zero-gradient biases, not several
    log_one = finish(launch(train_args(pipe, one, 4, steps=2), devices=1, fsdp_min_bytes=1024))
    log_sharded = finish(launch(train_args(pipe, sharded, 1, "--fsdp_parallelism=4", steps=2), devices=4,
                                fsdp_min_bytes=1024))
    np.testing.assert_allclose(losses(sharded), losses(one), rtol=2e-4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    ours, reference = (safetensors.numpy.load_file(folder / weights) for folder in (sharded, one))
    assert ours.keys() == reference.keys()
    # atol: a tenth of one Adam step (lr 1e-4). Biases in front of a one-channel-per-group GroupNorm have an
    # analytically zero gradient, and Adam turns its float noise into updates of up to ~1e-5 that differ with
    # the reduction order; every other param moves by ~lr per step, so a wrong sharded gradient shows at 1e-4.
    for name, value in reference.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=2e-5, err_msg=name)
    (ratio_one,) = re.findall(r"params \+ optimizer state: .* MB \(1/([0-9.]+)\)", log_one)
    (ratio,) = re.findall(r"params \+ optimizer state: .* MB \(1/([0-9.]+)\)", log_sharded)
    print(f"params + optimizer state per device: 1/{ratio} of the unsharded bytes with fsdp=4")
    assert float(ratio_one) == 1.0 and float(ratio) >= 3.5, (ratio, log_sharded[-3000:])
    assert "sharding of the trained params:" in log_sharded and "unet/down_blocks_0" in log_sharded
