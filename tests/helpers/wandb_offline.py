"""Read an offline W&B run file (``offline-run-*/run-*.wandb``) without the network.

The file is a LevelDB-style log (``:W&B`` header, 32 KiB blocks, records split into
FULL/FIRST/MIDDLE/LAST chunks) of ``wandb_internal_pb2.Record`` protobufs. wandb >= 0.2x no
longer ships a Python reader, so this is a minimal one for tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B", f"{path}: not a W&B run file"
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pos += CHUNK.size
        if kind == 0 and length == 0:
            break
        payload, pos = data[pos : pos + length], pos + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def summarise(path: str | Path) -> dict:
    """``{"history": [{key: value}], "config": {key: value}}`` of one run file."""
    history, config = [], {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            for i in r.config.update:
                config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return {"history": history, "config": config}
