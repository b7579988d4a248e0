"""Kernels with their plain-XLA fallbacks: Pallas on GPU where XLA alone is not fast enough."""
