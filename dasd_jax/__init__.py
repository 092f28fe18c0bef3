"""dasd_jax: Distribution-Aligned Sequence Distillation (DASD) in JAX/Flax NNX.

Pipeline (one module per stage): sample -> score -> select -> train (stages 1, 2) ->
mixed_policy -> train (stage 3) -> evaluate -> export. Shared pieces: config, sharding,
models (Qwen3 and checkpoints), logprobs, tokenizer.
"""

__version__ = "0.1.0"
