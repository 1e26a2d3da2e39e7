"""Preference data: Pick-a-Pic v2 pairs (Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908) and the
latent/text-embedding cache. Importing this package does not import diffusers or datasets."""

from diffdpo.data.cache import CachedPairs, build_cache, cache_key, collate_cached
from diffdpo.data.collate import collate_pairs
from diffdpo.data.pairs import PickAPicPairs
from diffdpo.data.relabel import RelabelResult, relabel_pairs
from diffdpo.data.schema import PICKAPIC_V2_COLUMNS, pickapic_v2_schema
from diffdpo.data.selection import PairStats
from diffdpo.data.writer import write_pickapic_parquet

__all__ = [
    "PICKAPIC_V2_COLUMNS",
    "CachedPairs",
    "PairStats",
    "PickAPicPairs",
    "RelabelResult",
    "build_cache",
    "cache_key",
    "collate_cached",
    "collate_pairs",
    "pickapic_v2_schema",
    "relabel_pairs",
    "write_pickapic_parquet",
]
