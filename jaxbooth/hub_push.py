"""``--push_to_hub``: the finished output folder to a Hub model repo, through huggingface_hub.

``create_repo`` then ``upload_folder``, as diffusers' scripts do. huggingface_hub streams every file from disk
(hashing and sending it in chunks) and the Hub takes weights, images and event files as large-file (LFS or Xet)
objects; nothing here reads a file whole. Checkpoints stay local (``IGNORE_PATTERNS``).

The token goes to huggingface_hub only, which sends it in the Authorization header. A failed upload raises a
``JaxboothError`` that keeps the local output, names the command that retries the upload, and carries no token:
the reason is scrubbed, and it is raised outside the ``except`` so no chained exception (whose request holds the
headers) travels with it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from jaxbooth.errors import JaxboothError

IGNORE_PATTERNS = ("checkpoint-*", "step_*", "epoch_*", "*.tmp*")
"""Not uploaded: resumable checkpoints (jaxbooth's ``checkpoint-N``, diffusers' ``step_*``/``epoch_*`` names) and
temporaries a killed writer left (``.name.tmpPID``). Everything else in the output folder is."""
COMMIT_MESSAGE = "jaxbooth: end of training"
_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")  # user access tokens: hf_ and 34 letters
_MAX_REASON = 800


def push_folder(out_dir: Path, *, repo_id: str | None, token: str | None) -> str:
    """Create the repo (or reuse it) and upload ``out_dir`` in one commit; returns the repo id.

    ``repo_id`` defaults to the folder's name under the token's account, as in diffusers.
    """
    import huggingface_hub

    out_dir = Path(out_dir)
    repo = repo_id or out_dir.name
    reason = None
    try:
        repo = huggingface_hub.create_repo(repo, exist_ok=True, token=token).repo_id
        huggingface_hub.upload_folder(repo_id=repo, folder_path=str(out_dir), token=token,
                                      commit_message=COMMIT_MESSAGE, ignore_patterns=list(IGNORE_PATTERNS))
    except Exception as error:  # network, auth, a refused card: the trained output is on disk either way
        reason = scrub(f"{type(error).__name__}: {error}", token)
    if reason is not None:
        login = "hf auth login" if _hub_version() >= (0, 34) else "huggingface-cli login"
        raise JaxboothError(f"push_to_hub: uploading {out_dir} to the Hub repo {repo!r} failed ({reason}). "
                            f"The trained output is kept in {out_dir}. To retry, log in (`{login}`, or set "
                            f"HF_TOKEN) and run:\n  {retry_command(out_dir, repo)}")
    return repo


def scrub(text: str, token: str | None) -> str:
    """``text`` without the token (nor anything shaped like a Hub token), shortened to one readable reason."""
    if token:
        text = text.replace(token, "<token>")
    text = _TOKEN_SHAPE.sub("hf_<token>", " ".join(text.split()))
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + " ..."


def retry_command(out_dir: Path, repo: str) -> str:
    """The shell command that uploads ``out_dir`` as ``push_folder`` does, for the installed huggingface_hub: ``hf
    upload`` (repeated ``--exclude`` from 1.0 on, one list before), ``huggingface-cli upload`` before 0.34."""
    version = _hub_version()
    program = "hf" if version >= (0, 34) else "huggingface-cli"
    if version >= (1, 0):
        excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in IGNORE_PATTERNS)
    else:
        excludes = "--exclude " + " ".join(shlex.quote(pattern) for pattern in IGNORE_PATTERNS)
    folder = shlex.quote(str(Path(out_dir).absolute()))
    return (f"{program} upload {shlex.quote(repo)} {folder} . {excludes} "
            f"--commit-message {shlex.quote(COMMIT_MESSAGE)}")


def _hub_version() -> tuple[int, ...]:
    import huggingface_hub

    return tuple(int(part) for part in re.findall(r"\d+", huggingface_hub.__version__)[:2])
