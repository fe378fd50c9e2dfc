"""megatron_let: Late-to-Early Training (LET) and friends on megatron-core."""

__version__ = "0.1.0"
