"""The reference log-prob cache.

    format   what is on disk (Arrow shards, plan.json, manifest.json) and the fingerprint of the computation
    write    precompute's side: shards written atomically, resumed, repaired; the manifest last
    read     train's and evaluate's side: verified once, then looked up by example_id
"""
from dpo_ds.cache.format import (
                                 FORMAT_VERSION,
                                 MANIFEST,
                                 PLAN,
                                 REFERENCE_COLUMNS,
                                 SCHEMA,
                                 SHARED_COLUMNS,
                                 describe_difference,
                                 fingerprint,
)
from dpo_ds.cache.read import RefCache, Reference, open_cache, open_verified, precision_warning, summary
from dpo_ds.cache.write import (
                                 complete_shards,
                                 damaged,
                                 remove_partial_shard,
                                 reopen,
                                 start,
                                 write_manifest,
                                 write_plan,
                                 write_shard,
)

__all__ = ["FORMAT_VERSION", "MANIFEST", "PLAN", "REFERENCE_COLUMNS", "SCHEMA", "SHARED_COLUMNS", "RefCache",
           "Reference", "complete_shards", "damaged", "describe_difference", "fingerprint", "open_cache",
           "open_verified", "precision_warning", "remove_partial_shard", "reopen", "start", "summary",
           "write_manifest", "write_plan", "write_shard"]
