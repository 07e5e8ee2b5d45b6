"""jaxbooth's own event writer: TensorBoard reads back what it wrote."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from jaxbooth.tensorboard import EventWriter, crc32c


def test_crc32c_known_answers() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA


def _records(path: Path) -> list[bytes]:
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return records


def test_writer_frames_records(tmp_path: Path) -> None:
    writer = EventWriter(tmp_path)
    writer.add_scalar("train/loss", 0.5, 3)
    writer.close()
    records = _records(writer.path)
    assert len(records) == 2 and b"brain.Event:2" in records[0] and b"train/loss" in records[1]


def test_tensorboard_reads_scalars_and_images(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = EventWriter(tmp_path)
    for step, loss in [(1, 0.9), (2, 0.7), (10, 0.25)]:
        writer.add_scalar("train/loss", loss, step)
    images = np.random.default_rng(0).integers(0, 255, (2, 8, 6, 3), dtype=np.uint8)
    writer.add_images("validation", images, 10)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [(s.step, round(s.value, 6)) for s in scalars] == [(1, 0.9), (2, 0.7), (10, 0.25)]
    assert sorted(events.Tags()["images"]) == ["validation/0", "validation/1"]
    image = events.Images("validation/1")[0]
    assert (image.step, image.width, image.height) == (10, 6, 8)
    from io import BytesIO

    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(BytesIO(image.encoded_image_string))), images[1])
