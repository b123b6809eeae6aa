"""Ready handler nodes (echo, kv, sqlite, fs), each a `node(**config)` factory."""
