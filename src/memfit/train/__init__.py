"""The training loop and its parts: precision policy, optimizer, accumulation step, OOM controller."""
