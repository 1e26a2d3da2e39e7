"""Writing Pick-a-Pic-shaped parquet files (tests, demos, relabelled copies): :func:`write_pickapic_parquet`
fills every Pick-a-Pic v2 column a row does not give."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffdpo.data.schema import PICKAPIC_V2_COLUMNS, pickapic_v2_schema

__all__ = ["write_pickapic_parquet"]


def _uid_for(data: bytes) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(data).hexdigest()))


def _encode_image_value(value: Any, where: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    raise TypeError(f"{where}: expected encoded image bytes or a PIL.Image, got {type(value).__name__}")


def write_pickapic_parquet(
    path: str | Path, rows: Sequence[dict[str, Any]], *, row_group_size: int | None = None
) -> Path:
    """Write ``rows`` as a parquet file with the exact Pick-a-Pic v2 schema; returns the path.

    Each row needs ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, or a ``PIL.Image`` which is
    stored as JPEG quality 95), ``label_0`` and ``label_1``. Any other Pick-a-Pic column may be given;
    missing ones are filled: ``are_different`` (the two byte strings differ), ``has_label`` (True),
    content-derived image uids, placeholder urls, ``best_image_uid`` (the winner's uid, "" for a tie),
    ``created_at`` (2023-01-01 plus the row number in seconds), ``model_0``/``model_1``
    ("synthetic"), ``ranking_id`` and ``__index_level_0__`` (row number), ``user_id`` (0) and
    ``num_example_per_prompt`` (1).
    """
    path = Path(path)
    known = {name for name, _ in PICKAPIC_V2_COLUMNS}
    required = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
    columns: dict[str, list[Any]] = {name: [] for name, _ in PICKAPIC_V2_COLUMNS}
    base_time = _dt.datetime(2023, 1, 1)
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        unknown = sorted(set(row) - known)
        if missing or unknown:
            raise ValueError(
                f"row {i}: missing {missing} / unknown {unknown} column(s); a row needs {list(required)} and may "
                f"set any of the Pick-a-Pic v2 columns {sorted(known)}"
            )
        jpg_0 = _encode_image_value(row["jpg_0"], f"row {i} jpg_0")
        jpg_1 = _encode_image_value(row["jpg_1"], f"row {i} jpg_1")
        label_0, label_1 = float(row["label_0"]), float(row["label_1"])
        uid_0 = row.get("image_0_uid", _uid_for(jpg_0))
        uid_1 = row.get("image_1_uid", _uid_for(jpg_1))
        best = uid_0 if label_0 > label_1 else uid_1 if label_1 > label_0 else ""
        url = "https://text-to-image-human-preferences.s3.us-east-2.amazonaws.com/images/{}.png"
        filled = {
            "are_different": jpg_0 != jpg_1,
            "best_image_uid": best,
            "created_at": base_time + _dt.timedelta(seconds=i),
            "has_label": True,
            "image_0_uid": uid_0,
            "image_0_url": url.format(uid_0),
            "image_1_uid": uid_1,
            "image_1_url": url.format(uid_1),
            "model_0": "synthetic",
            "model_1": "synthetic",
            "ranking_id": i,
            "user_id": 0,
            "num_example_per_prompt": 1,
            "__index_level_0__": i,
        }
        filled.update(row)
        filled.update(jpg_0=jpg_0, jpg_1=jpg_1, label_0=label_0, label_1=label_1)
        for name in columns:
            columns[name].append(filled[name])
    schema = pickapic_v2_schema()
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
