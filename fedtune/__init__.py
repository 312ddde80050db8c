"""fedtune: federated and offsite tuning of large language models with PEFT adapters."""

__version__ = "0.1.0"

# Bumped whenever the coordinator's on-disk layout (SQLite schema, store layout) changes
# incompatibly; a coordinator refuses a state dir written with another value.
STATE_FORMAT = 2
