"""Triton kernels with their PyTorch references and CPU paths (installed as specforge_mcore.kernels)."""
