"""The Pick-a-Pic v2 schema: its columns in stored order, their Arrow types, and the Arrow schema
with Hugging Face ``datasets`` feature metadata (Kirstain et al. 2023, ``yuvalkirstain/pickapic_v2``)."""

from __future__ import annotations

import json

import pyarrow as pa

__all__ = ["PICKAPIC_V2_COLUMNS", "pickapic_v2_schema"]

#: Columns of ``yuvalkirstain/pickapic_v2`` in their stored order, with their Arrow types
#: (from the dataset card's ``dataset_info.features``).
PICKAPIC_V2_COLUMNS: tuple[tuple[str, str], ...] = (
    ("are_different", "bool"),
    ("best_image_uid", "string"),
    ("caption", "string"),
    ("created_at", "timestamp[ns]"),
    ("has_label", "bool"),
    ("image_0_uid", "string"),
    ("image_0_url", "string"),
    ("image_1_uid", "string"),
    ("image_1_url", "string"),
    ("jpg_0", "binary"),
    ("jpg_1", "binary"),
    ("label_0", "float64"),
    ("label_1", "float64"),
    ("model_0", "string"),
    ("model_1", "string"),
    ("ranking_id", "int64"),
    ("user_id", "int64"),
    ("num_example_per_prompt", "int64"),
    ("__index_level_0__", "int64"),
)

_ARROW_TYPES = {
    "bool": pa.bool_(),
    "string": pa.string(),
    "timestamp[ns]": pa.timestamp("ns"),
    "binary": pa.binary(),
    "float64": pa.float64(),
    "int64": pa.int64(),
}
_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_LABEL_COLUMNS = ("label_0", "label_1")


def pickapic_v2_schema() -> pa.Schema:
    """The Arrow schema of Pick-a-Pic v2 parquet shards, with Hugging Face ``datasets`` feature metadata."""
    fields = [pa.field(name, _ARROW_TYPES[kind]) for name, kind in PICKAPIC_V2_COLUMNS]
    hf_dtype = {"string": "string", "bool": "bool", "timestamp[ns]": "timestamp[ns]", "binary": "binary",
                "float64": "float64", "int64": "int64"}
    features = {name: {"dtype": hf_dtype[kind], "_type": "Value"} for name, kind in PICKAPIC_V2_COLUMNS}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=meta)
