"""Runner: validation, shard execution under leases, finalize, and the worker loop."""
