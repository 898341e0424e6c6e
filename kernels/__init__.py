"""Triton kernels for expert dispatch and attention, each beside its plain-PyTorch
reference, which is its specification. Triton installs only on Linux x86-64; everything
outside this package's Triton paths works without it."""
