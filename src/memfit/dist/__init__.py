"""More than one process: torchrun's environment, the process group, the agreed decisions, the launcher."""
