"""Prompt tokenization: the pipeline's tokenizer (CLIP, or IF's T5), a cached tokenize function, a tiny vocab maker.

Owns how prompts become `input_ids` / `attention_mask`, with the semantics of diffusers'
DreamBooth `tokenize_prompt`. transformers is imported lazily inside functions (it works
without torch), so importing this module pulls in neither jax nor torch nor transformers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth.errors import JaxboothError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

# Words the tiny vocab learns whole; anything else still tokenizes, byte by byte.
TINY_VOCAB_WORDS = (
    "a an the photo picture image painting drawing sketch render style of in on at with and or "
    "sks toy dog cat person man woman boy girl child baby robot figure doll teddy bear car ball "
    "red yellow blue green white black brown orange purple pink gray grey gold silver colorful "
    "small big large tiny little tall short old new young happy sad cute beautiful ugly bright "
    "dark shiny soft hard wooden plastic metal glass paper stone high quality detailed realistic "
    "studio light lighting shadow background foreground sky sea beach forest mountain city street "
    "room table floor wall window door garden park snow rain sun moon night day morning evening "
    "sitting standing running jumping walking sleeping looking holding wearing playing flying "
    "front back side top bottom left right center close up view portrait landscape closeup "
    "oil watercolor pencil digital art artist famous by van gogh monet picasso anime cartoon "
    "film camera lens blur bokeh sharp focus wide angle shot scene from under over near far "
    "is are was be this that these those it its his her their my our your one two three many "
    "hat shirt dress shoes glasses scarf box house tree flower grass water fire ice rock sand "
    "bowl cup plate book chair bed sofa lamp clock phone computer bag basket pillow blanket"
)


def load_tokenizer(
    model_dir_or_id: str | Path,
    *,
    subfolder: str = "tokenizer",
    tokenizer_name: str | Path | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
) -> Any:
    """Load the pipeline's tokenizer the way diffusers' DreamBooth scripts do.

    `tokenizer_name` (diffusers' `--tokenizer_name`) wins and is read without a subfolder;
    otherwise `<model>/<subfolder>` (`tokenizer_2` for SDXL's second encoder). A local folder
    is checked first so a missing file gives a clear error instead of a Hub lookup. A local folder
    whose config names another class (DeepFloyd IF's `T5Tokenizer`), or that has a sentencepiece
    `spiece.model` instead of CLIP's vocab.json/merges.txt, loads with `AutoTokenizer`; anything
    else with `CLIPTokenizer`. `model_max_length` falls back to 77 when the config lacks it
    (transformers then reports ~1e30, and `padding="max_length"` would try to pad to that).
    """
    source = Path(tokenizer_name) if tokenizer_name is not None else Path(model_dir_or_id)
    sub = None if tokenizer_name is not None else subfolder
    local = source / sub if sub else source
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if cache_dir is not None:  # --cache_dir and --hub_token reach a Hub tokenizer as they reach the model
        kwargs["cache_dir"] = str(cache_dir)
    if token is not None:
        kwargs["token"] = token
    clip = True
    if source.exists():
        _check_tokenizer_folder(local)
        target, sub = str(local), None
        clip = _is_clip_folder(local)
    else:
        target = str(tokenizer_name if tokenizer_name is not None else model_dir_or_id)
        if _looks_like_path(target):
            raise JaxboothError(
                f"model folder {target} does not exist; pass an existing diffusers model folder or a Hub id."
            )
    if clip:
        from transformers import CLIPTokenizer as tokenizer_class
    else:  # importing AutoTokenizer imports torch where installed: only IF's (torch-only) T5 folders need it
        from transformers import AutoTokenizer as tokenizer_class

    try:
        tokenizer = tokenizer_class.from_pretrained(target, subfolder=sub or "", **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        where = f"{target} (subfolder {sub!r})" if sub else target
        files = "tokenizer/vocab.json and tokenizer/merges.txt" if clip else "its tokenizer files"
        raise JaxboothError(
            f"could not load the {'CLIP ' if clip else ''}tokenizer from {where}: {str(exc).rstrip('.')}. "
            f"Pass a local diffusers model folder with {files}, or --tokenizer_name."
        ) from exc
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10_000:
        tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a local path."""
    return name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1


def _configured_class(folder: Path) -> str | None:
    """`tokenizer_class` of the folder's tokenizer_config.json, or None."""
    try:
        name = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def _is_clip_folder(folder: Path) -> bool:
    """A CLIP BPE tokenizer folder (SD, SDXL), as opposed to e.g. IF's sentencepiece T5 one."""
    name = _configured_class(folder)
    if name is not None:
        return name.startswith("CLIPTokenizer")
    return not (folder / "spiece.model").is_file() or (folder / "vocab.json").is_file()


def _check_tokenizer_folder(folder: Path) -> None:
    """Fail early, naming the folder and the missing files, for a local model folder."""
    if not folder.is_dir():
        raise JaxboothError(
            f"tokenizer folder {folder} does not exist; a diffusers model folder has the "
            "tokenizer in its 'tokenizer' subfolder (and 'tokenizer_2' for SDXL), or pass --tokenizer_name."
        )
    has_json = (folder / "tokenizer.json").is_file()
    if not _is_clip_folder(folder):
        _check_sentencepiece_folder(folder, has_json)
        return
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing and not has_json:
        found = sorted(p.name for p in folder.iterdir())
        raise JaxboothError(
            f"tokenizer folder {folder} lacks {', '.join(missing)} (found: {', '.join(found) or 'nothing'}); "
            "copy the tokenizer files from the base model."
        )


def _check_sentencepiece_folder(folder: Path, has_json: bool) -> None:
    """A non-CLIP folder needs tokenizer.json, or spiece.model plus what converts it (sentencepiece, protobuf)."""
    if has_json:
        return
    if not (folder / "spiece.model").is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise JaxboothError(
            f"tokenizer folder {folder} has neither tokenizer.json nor spiece.model (found: "
            f"{', '.join(found) or 'nothing'}); copy the tokenizer files from the base model."
        )
    missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if not _importable(module)]
    if missing:
        raise JaxboothError(
            f"tokenizer folder {folder} holds only a sentencepiece model (spiece.model, as DeepFloyd IF's), which "
            f"transformers converts with {' and '.join(missing)}: pip install {' '.join(missing)}"
        )


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package (google.*)
        return False


def make_tokenize_fn(
    tokenizer: Any, max_length: int | None = None, *, cache_size: int = 65536
) -> Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]:
    """Return `tokenize(prompts) -> (input_ids int32 [n, L], attention_mask int32 [n, L])`.

    Mirrors diffusers' `tokenize_prompt`: padding="max_length", truncation=True and
    L = `max_length` (diffusers' `--tokenizer_max_length`) or `tokenizer.model_max_length`.
    DreamBooth repeats a handful of prompts, so each prompt is tokenized once and cached;
    the cache is cleared when it reaches `cache_size` (per-image captions with shuffling).
    """
    length = int(max_length or tokenizer.model_max_length)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def tokenize(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = list(prompts)
        new = sorted({p for p in prompts if p not in cache})
        if new:
            if len(cache) + len(new) > cache_size:
                cache.clear()
            enc = tokenizer(new, padding="max_length", truncation=True, max_length=length)
            for p, ids, mask in zip(new, enc["input_ids"], enc["attention_mask"], strict=True):
                cache[p] = (np.asarray(ids, np.int32), np.asarray(mask, np.int32))
        if not prompts:
            return np.zeros((0, length), np.int32), np.zeros((0, length), np.int32)
        rows = [cache[p] for p in prompts]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    tokenize.max_length = length  # type: ignore[attr-defined]
    return tokenize


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table; vocab ids 0..255 follow its order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _learn_merges(words: Iterable[str], max_merges: int | None) -> list[tuple[str, str]]:
    """Plain BPE training over unique words; ties broken by the pair itself, so deterministic.

    Merges are applied by rank at tokenize time, which reproduces this segmentation, so a
    word trained to completion becomes one token.
    """
    byte_chars = _bytes_to_unicode()
    seqs = []
    for word in dict.fromkeys(w.lower() for w in words if w):
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while max_merges is None or len(merges) < max_merges:
        counts = Counter(pair for s in seqs for pair in zip(s, s[1:], strict=False))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def write_tiny_clip_tokenizer(
    out_dir: str | Path,
    words: Iterable[str] | str | None = None,
    *,
    max_merges: int | None = None,
    model_max_length: int = CLIP_MAX_LENGTH,
) -> int:
    """Write a small but real byte-level CLIP BPE tokenizer folder; return its vocab size.

    Same files as a diffusers `tokenizer/` folder (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json), so `CLIPTokenizer.from_pretrained`
    takes the same path as for Stable Diffusion. Layout follows CLIP: 256 byte chars, their
    "</w>" forms, the merges, then <|startoftext|> and <|endoftext|> last, so the eos id is
    the largest id (CLIP's legacy argmax pooling finds it). Deterministic for fixed words.
    """
    if words is None:
        words = TINY_VOCAB_WORDS
    if isinstance(words, str):
        words = words.split()
    merges = _learn_merges(words, max_merges)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)
