"""LoRA adapters: the on-disk store, and keeping a running server's loaded adapters in step with it."""
