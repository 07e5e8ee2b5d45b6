"""A TensorBoard event-file writer with no dependencies (scalars and PNG images).

Why our own: tensorboardX imports torch (seconds of start-up and ~190 MB resident on the
JAX path) and torch.utils.tensorboard needs torch and tensorboard. The file format is
small and stable: TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C)
around ``tensorflow.Event`` protos, of which we need five fields, encoded here by hand.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _event(step: int, *, summary_values: list[bytes] = (), file_version: str | None = None) -> bytes:
    event = _varint(1 << 3 | 1) + struct.pack("<d", time.time())  # wall_time: double
    event += _int_field(2, step)
    if file_version is not None:
        event += _field(3, file_version.encode())
    if summary_values:
        event += _field(5, b"".join(_field(1, value) for value in summary_values))  # Summary.value
    return event


def scalar_value(tag: str, value: float) -> bytes:
    """A ``Summary.Value`` with ``simple_value`` (TensorBoard's scalars dashboard)."""
    return _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))


def image_value(tag: str, image: np.ndarray) -> bytes:
    """A ``Summary.Value`` holding one HWC uint8 image, PNG-encoded."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    height, width, channels = image.shape
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format="PNG")
    encoded = (_int_field(1, height) + _int_field(2, width) + _int_field(3, channels)
               + _field(4, buffer.getvalue()))
    return _field(1, tag.encode()) + _field(4, encoded)


class EventWriter:
    """Appends events to ``logdir/events.out.tfevents.<time>.<host>``, as TensorBoard reads them.

    The subset of tensorboardX's ``SummaryWriter`` jaxbooth uses: ``add_scalar``,
    ``add_images`` (NHWC uint8; one image per tag ``tag/k``), ``flush``, ``close``.
    """

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115  (held open for the run)
        self._write(_event(0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self._file.write(header + _masked_crc(header) + event + _masked_crc(event))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(step, summary_values=[scalar_value(tag, value)]))

    def add_images(self, tag: str, images: np.ndarray, step: int, dataformats: str = "NHWC") -> None:
        if dataformats != "NHWC":
            raise ValueError(f"add_images: only NHWC uint8 images are written, not {dataformats}")
        values = [image_value(f"{tag}/{k}", image) for k, image in enumerate(np.asarray(images))]
        self._write(_event(step, summary_values=values))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
