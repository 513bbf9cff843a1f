"""The shape of the reference decoder: every size the model, its KV cache and its inputs are built from."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a Llama-style decoder with grouped-query attention and a paged KV cache.

    The defaults are the demo/benchmark model (about 110M parameters): big enough that a decode step is
    dominated by real work on a GPU, small enough that a float32 step at batch 64 stays well under a second
    on a 2-core CPU. ``ModelConfig.tiny()`` is the unit-test model.
    """

    vocab_size: int = 8192
    hidden_size: int = 1024
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2816
    block_size: int = 16  # tokens per KV-cache page
    max_seq_len: int = 2048  # longest sequence RoPE tables and block tables are sized for
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A model that runs a decode step in milliseconds on a CPU, for unit tests."""
        return cls(
            vocab_size=256,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            block_size=4,
            max_seq_len=64,
        )

    @classmethod
    def small(cls) -> "ModelConfig":
        """The smallest model whose attention every accelerator's fused kernels take: heads of 128 dims and
        blocks of 16 tokens, what Ascend's fused infer-attention op takes in its packed layout (torch_npu 7.3 on),
        with a tiny model's widths otherwise. For quick runs of the bench and the demo off the cpu."""
        return cls(
            vocab_size=256,
            hidden_size=256,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=128,
            intermediate_size=256,
            block_size=16,
            max_seq_len=256,
        )

    @classmethod
    def large(cls) -> "ModelConfig":
        """Big enough for tensor parallelism to matter (hidden 4096, 8 layers of a 7B-shaped Llama, about
        1.7B parameters): each rank's matmuls are large enough that halving them beats the all-reduces."""
        return cls(
            vocab_size=32000,
            hidden_size=4096,
            num_layers=8,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=11008,
            max_seq_len=4096,
        )

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "block_size", "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each KV head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dims")
        if self.max_seq_len % self.block_size:
            raise ValueError(
                f"ModelConfig.max_seq_len ({self.max_seq_len}) must be a multiple of block_size "
                f"({self.block_size}) so a full block table covers it exactly"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_eps > 0:
            raise ValueError(f"ModelConfig.rms_eps must be > 0, got {self.rms_eps!r}")

    def tensor_parallel_shard(self, tp_size: int) -> "ModelConfig":
        """The shapes one of ``tp_size`` tensor-parallel ranks computes: its query and KV heads and its slice
        of the MLP's inner dimension (what its layers and its KV cache are built from)."""
        if tp_size == 1:
            return self
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) % tp_size:
                raise ValueError(
                    f"ModelConfig.{name} ({getattr(self, name)}) must be divisible by the tensor-parallel size "
                    f"({tp_size}): each rank holds an equal share"
                )
        return replace(
            self,
            num_heads=self.num_heads // tp_size,
            num_kv_heads=self.num_kv_heads // tp_size,
            intermediate_size=self.intermediate_size // tp_size,
        )

    @property
    def queries_per_kv_head(self) -> int:
        """How many query heads share one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_blocks_per_seq(self) -> int:
        """Block-table width that covers ``max_seq_len`` tokens."""
        return self.max_seq_len // self.block_size
