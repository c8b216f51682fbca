"""Bottom layer: helpers that import nothing of the package (atomic file and folder writes,
generator snapshots, token-id hashes, tensor-parallel shard transforms, config fields that are
flags)."""
