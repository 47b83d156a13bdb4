"""Packed-model files: safetensors (no pickle), written atomically (temp file, fsync, rename),
with a format version and a CRC32 per tensor in the metadata; loading rejects truncated,
corrupted, inconsistent and newer-version files with a ValueError naming the problem."""
from __future__ import annotations

import json
import os
import zlib

import torch
from torch import Tensor

from mixedprec.atomic import write_atomically
from mixedprec.formats.packed import PackedWeight

FORMAT_NAME = "mixedprec.packed"
# 2: float32 codebooks allowed (version 1 held float16 only); 3: models of any architecture
# (mixedprec subtrees described by module path, loaded into a freshly built model; nn/serialization.py);
# 4: packed convs with nn.Conv2d's other padding modes (a ``padding_mode`` attribute, which a reader of
# version 3 would ignore: wrong outputs, so it must refuse the file)
FORMAT_VERSION = 4
FIELDS = ("codebook", "channel_scale", "codes", "keep_bitmap")  # the stored tensors of a PackedWeight


def packed_tensors(p: PackedWeight, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """The stored tensors of ``p`` under ``prefix`` and its JSON-able description."""
    tensors = {f"{prefix}{name}": getattr(p, name) for name in FIELDS if getattr(p, name) is not None}
    return tensors, {"shape": list(p.shape), "bits": p.bits}


def packed_from_tensors(tensors: dict[str, Tensor], prefix: str, description: dict) -> PackedWeight:
    """Inverse of ``packed_tensors``; a ValueError names the layer whose data is inconsistent."""
    name = prefix.rstrip(".") or "<root>"
    try:
        shape, bits = tuple(int(s) for s in description["shape"]), description["bits"]
        fields = {f: tensors.get(f"{prefix}{f}") for f in FIELDS}
        missing = [f for f in FIELDS[:3] if fields[f] is None]
        if missing:
            raise ValueError(f"missing tensors {missing}")
        return PackedWeight(shape, bits, **fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"packed layer {name!r} is inconsistent: {exc}") from None


def save_file(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict) -> None:
    """Writes ``tensors`` and the JSON-able ``metadata`` as a versioned safetensors file, atomically:
    a crash leaves either the old file or the new one, never a partial one."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "content": json.dumps(metadata),
              "crc32": json.dumps({k: crc32(v) for k, v in tensors.items()})}
    write_atomically(path, _sorted_header(save(tensors, metadata=header)))


def _sorted_header(data: bytes) -> bytes:
    """The safetensors bytes with their JSON header's keys sorted: safetensors writes the header
    from hash maps, in an order that changes from process to process, and a file's bytes should
    depend on its content alone."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data that follows to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + length:]


def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a file written by ``save_file``, checked: a ValueError says what is wrong."""
    from safetensors.torch import load

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from None
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a mixedprec packed model (format {header.get('format')!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(header["version"])
        content, checksums = json.loads(header["content"]), json.loads(header["crc32"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: malformed mixedprec header: {exc}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by packed format version {version}, this mixedprec reads versions "
                         f"up to {FORMAT_VERSION}; upgrade mixedprec to load it")
    if set(checksums) != set(tensors):
        raise ValueError(f"{path}: tensors {sorted(set(checksums) ^ set(tensors))} are missing or unexpected")
    for name, t in tensors.items():
        if crc32(t) != checksums[name]:
            raise ValueError(f"{path}: tensor {name!r} is corrupted (CRC32 mismatch)")
    return tensors, content


def crc32(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0
