"""Checkpoint machinery used by memfit.ckpt.checkpointer.Checkpointer: io (bytes, manifests, verification),
policy (keep-K, light conversion, clean-up), mirror (background copies to --mirror-to)."""
