"""--dataset_config: kohya's dataset config TOML in its documented form (and the same as YAML) becomes
jaxbooth subsets with kohya's inheritance (subset -> dataset -> [general] -> the run's flags) and run
settings (resolution, batch size, buckets, prior preservation); every mistake names the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jaxbooth.data import dataset_config as dc
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec, replace_flat
from tests._logs import logged_warning

# kohya's docs/config_README-en.md example, DreamBooth part, with this test's folders.
DOCUMENTED = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 32
batch_size = 2
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3
  num_repeats = 5
  flip_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, count in (("hoge", 2), ("fuga", 1), ("reg", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "hoge" / "0.txt").write_text("hoge girl, smile, outdoors\n")
    return tmp_path


def write(root: Path, text: str, name: str = "d.toml") -> Path:
    path = root / name
    path.write_text(text.format(root=root))
    return path


def spec_for(path: Path, *flags: str):
    return load_spec([f"--dataset_config={path}", *flags])


def resolved(path: Path, *flags: str):
    spec = spec_for(path, *flags)
    return replace_flat(spec, **dc.spec_overrides(spec))


def problems(path: Path) -> str:
    with pytest.raises(JaxboothError) as info:
        dc.load_dataset_config(spec_for(path) if path.suffix else path)
    return str(info.value)


def test_the_documented_toml_gives_its_subsets_with_kohyas_inheritance(root: Path) -> None:
    cfg = dc.load_dataset_config(spec_for(write(root, DOCUMENTED)))
    got = [(s.folder.name, s.prompt, s.is_class, s.repeats, s.keep_tokens, s.shuffle_caption, s.caption_extension,
            s.random_flip) for s in cfg.subsets]
    assert got == [("hoge", "hoge girl", False, 1, 2, True, ".txt", False),
                   ("fuga", "fuga boy", False, 5, 3, True, ".txt", True),
                   ("reg", "human", True, 1, 1, True, ".txt", False)]
    assert cfg.settings == {"resolution": 32, "train_batch_size": 2}


def test_the_same_structure_as_yaml_gives_the_same_subsets(root: Path) -> None:
    toml_path = write(root, DOCUMENTED)
    import tomllib

    data = tomllib.loads(toml_path.read_text())
    yaml_path = root / "d.yaml"
    yaml_path.write_text(yaml.safe_dump(data))
    assert dc.load_dataset_config(spec_for(yaml_path)).subsets == dc.load_dataset_config(spec_for(toml_path)).subsets


def test_unset_options_fall_back_to_the_run_flags_then_kohya_defaults(root: Path) -> None:
    path = write(root, "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n")
    plain = dc.load_dataset_config(spec_for(path, "--instance_prompt=sks")).subsets[0]
    assert (plain.prompt, plain.caption_extension, plain.shuffle_caption, plain.repeats) == \
        ("sks", dc.KOHYA_CAPTION_EXTENSION, False, 1)
    flagged = dc.load_dataset_config(spec_for(path, "--shuffle_caption", "--keep_tokens=2", "--caption_separator=;",
                                              "--caption_dropout_rate=0.1", "--caption_extension=.txt",
                                              "--repeats=3", "--random_flip")).subsets[0]
    assert (flagged.shuffle_caption, flagged.keep_tokens, flagged.caption_separator, flagged.caption_dropout_rate,
            flagged.caption_extension, flagged.repeats, flagged.random_flip) == (True, 2, ";", 0.1, ".txt", 3, True)


def test_unknown_keys_name_the_file_the_line_and_the_closest_key(root: Path) -> None:
    text = DOCUMENTED.replace("keep_tokens = 3", "keep_tokenz = 3").replace("batch_size = 2", "bach_size = 2")
    message = problems(write(root, text))
    path = root / "d.toml"
    assert f"{path}:9: unknown key 'bach_size' in [[datasets]]; did you mean batch_size?" in message
    assert f"{path}:20: unknown key 'keep_tokenz' in [[datasets.subsets]]; did you mean keep_tokens?" in message


def test_kohya_keys_jaxbooth_lacks_and_misplaced_keys_are_errors_never_ignored(root: Path) -> None:
    text = DOCUMENTED.replace("keep_tokens = 1\n\n#", "keep_tokens = 1\ncolor_aug = true\nis_reg = true\n\n#") \
        .replace("  keep_tokens = 3\n", "  keep_tokens = 3\n  enable_wildcard = true\n  batch_size = 2\n")
    message = problems(write(root, text))
    path = root / "d.toml"
    assert f"{path}:5: color_aug is a kohya option jaxbooth does not support" in message
    assert f"{path}:6: is_reg belongs in [[datasets.subsets]], not in [general]" in message
    assert f"{path}:23: enable_wildcard is a kohya option jaxbooth does not support" in message
    assert f"{path}:24: batch_size belongs in [general] or [[datasets]], not in [[datasets.subsets]]" in message


def test_yaml_mistakes_name_their_lines_too(root: Path) -> None:
    path = root / "d.yml"
    path.write_text(f"general:\n  shuffle_caption: yes\ndatasets:\n  - subsets:\n      - image_dir: {root}/hoge\n"
                    "        num_repeat: 2\n")
    assert f"{path}:6: unknown key 'num_repeat' in [[datasets.subsets]]; did you mean num_repeats?" in problems(path)


@pytest.mark.parametrize("text, expected", [
    ("[[datasets]]\nresolution = 32\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n"
     "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{root}/fuga'\n",
     "different resolution values (d.toml:2: resolution = 32; d.toml:6: resolution = 64)"),
    ("[[datasets]]\nresolution = [32, 64]\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n",
     "d.toml:2: resolution = [32, 64]: jaxbooth trains square images"),
    ("[[datasets]]\nbatch_size = 0\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n",
     "d.toml:2: batch_size = 0: must be >= 1"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  class_tokens = 'x'\n", "d.toml:2: this [[datasets.subsets]] has no "
                                                                    "image_dir"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'nowhere'\n", "d.toml:3: image_dir = 'nowhere': no such"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n  [[datasets.subsets]]\n"
     "  image_dir = '{root}/hoge'\n", "d.toml:4: image_dir"),
    ("[general]\nshuffle_caption = 'yes'\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root}/hoge'\n",
     "d.toml:2: shuffle_caption = 'yes': must be true or false"),
    ("[general\n", "invalid TOML"),
    ("[general]\n", "no [[datasets]]"),
])
def test_what_jaxbooth_cannot_train_is_refused_naming_the_line_and_the_fix(root: Path, text: str,
                                                                          expected: str) -> None:
    message = problems(write(root, text)).replace(f"{root}/", "")
    assert expected in message


def test_spec_overrides_set_the_run_from_the_file_which_wins_over_flags(root: Path) -> None:
    path = write(root, DOCUMENTED)
    assert dc.spec_overrides(spec_for(path)) == {"resolution": 32, "train_batch_size": 2,
                                                 "with_prior_preservation": True}
    assert dc.spec_overrides(spec_for(path, "--resolution=32"))["resolution"] == 32  # wins over fill_defaults too
    flags = ["--resolution=64", "--train_batch_size=2"]
    with logged_warning(r"resolution = 32 wins over --resolution=64") as seen:
        assert dc.spec_overrides(spec_for(path, *flags), given={"resolution", "train_batch_size"})["resolution"] == 32
    assert not [m for m in seen if "train_batch_size" in m]  # the same value: nothing to say
    no_reg = write(root, DOCUMENTED.split("  [[datasets.subsets]]\n  is_reg")[0], "noreg.toml")
    with pytest.raises(JaxboothError, match="no is_reg subset"):
        dc.spec_overrides(spec_for(no_reg, "--with_prior_preservation"))
    flips = write(root, "[general]\nflip_aug = true\n" + DOCUMENTED.split("[general]\n")[1], "flips.toml")
    assert dc.spec_overrides(spec_for(flips))["random_flip"] is True


def test_the_dataset_reads_captions_repeats_and_reg_images(root: Path) -> None:
    ds = dc.config_dataset(resolved(write(root, DOCUMENTED)))
    assert [(e.path.parent.name, e.caption) for e in ds.examples] == [
        ("hoge", "hoge girl, smile, outdoors"), ("hoge", "hoge girl"), ("fuga", "fuga boy"),
        ("reg", "human"), ("reg", "human")]
    assert len(ds.instance_items) == 2 + 5 and len(ds.class_items) == 2 and ds.captions_vary


def test_a_spec_without_the_files_settings_is_refused_naming_the_fix(root: Path) -> None:
    with pytest.raises(JaxboothError, match="with_prior_preservation.*spec_overrides"):
        dc.config_dataset(spec_for(write(root, DOCUMENTED)))


def test_the_fingerprint_follows_per_subset_settings(root: Path) -> None:
    first = dc.config_dataset(resolved(write(root, DOCUMENTED))).fingerprint
    again = dc.config_dataset(resolved(write(root, DOCUMENTED))).fingerprint
    changed = dc.config_dataset(resolved(write(root, DOCUMENTED.replace("keep_tokens = 3", "keep_tokens = 0"))))
    assert first == again != changed.fingerprint


def test_spec_validation_checks_the_file_and_refuses_image_folder_flags(root: Path) -> None:
    path = write(root, DOCUMENTED)
    with pytest.raises(JaxboothError, match="--instance_data_dir"):
        spec_for(path, f"--instance_data_dir={root / 'hoge'}")
    with pytest.raises(JaxboothError, match=r"typo.toml:2: unknown key 'shufle_caption'"):
        spec_for(write(root, DOCUMENTED.replace("shuffle_caption", "shufle_caption"), "typo.toml"))
    spec_for(path, "--prior_loss_weight=0.5", "--keep_tokens=2")  # not inert with a config: no error
