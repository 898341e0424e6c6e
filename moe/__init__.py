"""A scaled-down GPT-4-style Mixture-of-Experts transformer in plain PyTorch."""
