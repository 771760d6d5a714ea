"""Two-phase commit across shards: global ids, the shared decision log, the commit round and recovery."""
