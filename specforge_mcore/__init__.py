"""specforge_mcore: EAGLE-3 draft training against Megatron-Core hosted frozen targets."""

__version__ = "0.1.0"
