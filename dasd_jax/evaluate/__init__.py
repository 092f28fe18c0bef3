"""Evaluation: avg@k / pass@k of checkpoints on local JSONL benchmarks."""
