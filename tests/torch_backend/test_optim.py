"""The torch backend's optimizer choice: fused AdamW where torch can run it, the same updates as the loop."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jaxbooth.spec import load_spec  # noqa: E402
from jaxbooth.torch_backend import optim  # noqa: E402


def _spec(*flags: str):
    return load_spec(["--pretrained_model_name_or_path=m", "--instance_data_dir=d", "--instance_prompt=p",
                      "--adam_weight_decay=0.01", *flags])


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((4, 3), (3,), (2, 5, 5))]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_runs_fused_on_cpu_params_with_the_updates_of_the_loop():
    spec = _spec()
    fused_params, loop_params = _params(), _params()
    fused, name = optim.make_optimizer(spec, [{"params": fused_params, "lr": 1e-2, "weight_decay": 0.01}])
    assert name == "torch AdamW (fused)" and fused.defaults["fused"] is True
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.01, betas=(spec.optim.adam_beta1,
                             spec.optim.adam_beta2), eps=spec.optim.adam_epsilon, foreach=False)
    _train(fused, fused_params)
    _train(loop, loop_params)
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_is_not_fused_under_deepspeed_or_where_torch_cannot_fuse():
    spec = _spec()
    optimizer, name = optim.make_optimizer(spec, [{"params": _params(), "lr": 1e-2, "weight_decay": 0.0}],
                                           under_deepspeed=True)
    assert name == "torch AdamW" and not optimizer.defaults.get("fused")
    assert not optim.fused_adam_fits([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}])
    assert not optim.fused_adam_fits([{"params": []}])
    assert optim.fused_adam_fits([{"params": _params()}])
