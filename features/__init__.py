"""Hand-crafted image features, extracted in parallel and cached on disk.

A *feature set* is a mapping ``{extractor name: parameters}``, e.g.
``{"hog": {"pixels_per_cell": 8}, "color": {}}``; its vector is the concatenation of the
extractors' vectors in **alphabetical order of the extractor names** (so a spec read back
from JSON or TOML, whatever its key order, gives the same columns and the same cache).
See :func:`features.extract.extract`.
"""

from features.extract import (
    EXTRACTORS,
    check_feature_set,
    extract,
    extract_central,
    extract_one,
    feature_length,
    set_cache_dir,
)

__all__ = [
    "EXTRACTORS",
    "check_feature_set",
    "extract",
    "extract_central",
    "extract_one",
    "feature_length",
    "set_cache_dir",
]
