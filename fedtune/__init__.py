"""fedtune: federated and offsite tuning of large language models with PEFT adapters."""

__version__ = "0.1.0"

# Bumped whenever the coordinator's on-disk layout (SQLite schema, store layout) changes
# incompatibly; a coordinator refuses a state dir written with another value.
STATE_FORMAT = 2

# The `fedtune` command keeps gRPC's C-core log lines off the terminal; that must happen before grpc
# is imported (below, through fedtune.errors), so it cannot wait for fedtune.cli.main.
from fedtune.cli import quiet_grpc_logs as _quiet_grpc_logs

_quiet_grpc_logs()

# fedtune's own peft tuners (bitfit, bottleneck) register with peft once peft is imported, so that
# `import fedtune` then `PeftModel.from_pretrained(base, dir)` loads them. torch and peft are not
# imported here: the coordinator's job engines import fedtune without them.
from fedtune.methods.tuners.registration import install_import_hook as _install_import_hook

_install_import_hook()
