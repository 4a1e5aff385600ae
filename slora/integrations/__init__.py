"""Integrations of slora's kernels into other systems (each imports its system lazily)."""
