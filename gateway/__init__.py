"""tellerloop gateway: the serving process (HTTP API, engine, confidence, storage)."""
