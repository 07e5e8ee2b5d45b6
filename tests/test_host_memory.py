"""glibc malloc tuning: applied on glibc unless the user opted out or set MALLOC_* themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxbooth import host_memory

CHECK = "from jaxbooth.host_memory import keep_freed_memory; print(keep_freed_memory())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.pop("JAXBOOTH_KEEP_FREED_MEMORY", None)
    return subprocess.run([sys.executable, "-c", CHECK], env={**env, **env_extra}, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")
def test_applies_on_glibc_and_respects_user_choices() -> None:
    assert _run({}) == "True"
    assert _run({"JAXBOOTH_KEEP_FREED_MEMORY": "0"}) == "False"
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False"
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "False"
