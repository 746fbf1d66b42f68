"""The contract every stage shares: the sweep spec, the trial config and its id, the MLflow layout,
prompt templates, image decoding and the build cache. It imports nothing of the project."""
