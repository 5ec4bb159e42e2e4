"""Training: everything that needs the `train` extra (transformers, tokenizers, tqdm, matplotlib)."""
