"""Model ports (Flax NNX) and Hugging Face checkpoint I/O."""
