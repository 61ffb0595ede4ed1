"""usage-metering: the streaming backend of the metering module (workers, CLI, local stack)."""

__version__ = "0.1.0"
