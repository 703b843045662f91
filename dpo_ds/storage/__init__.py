"""Files a run can trust: files (atomic writes, fsync), owner (who may write an output directory: the lock,
its kind of output), fingerprint (content hashes of data, tokenizers and weights)."""
