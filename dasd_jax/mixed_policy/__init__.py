"""Mixed-policy distillation data (paper step 7): student prefixes, teacher continuations."""
