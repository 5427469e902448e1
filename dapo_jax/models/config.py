"""Model configuration for Qwen2 / Qwen2.5 (and Llama-family) decoders, with size presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from dapo_jax.runtime.cli_errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
# Attention implementations (`models.attention`); "auto" picks by platform at trace time.
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + numerics of a decoder-only transformer (Qwen2 / Llama layout)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not.
    max_position_embeddings: int = 32768
    architecture: str = "qwen2"  # "qwen2" or "llama": selects the HF class on export.
    # Numerics: storage dtype of parameters and dtype of matmuls/activations. Softmax, norms and
    # log-probs always run in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # per-layer gradient checkpointing: none | full | dots
    scan_layers: bool = True  # lax.scan over layers keeps compile time flat in depth.
    # auto (splash on TPU, pallas_gpu on GPU, blockwise on CPU) | dense | blockwise | splash |
    # pallas_gpu. Not part of the architecture: never written to config.json.
    attention: str = "auto"
    hf_torch_dtype: str = "float32"  # dtype to write on export (the checkpoint's own dtype).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                            f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                            f"{self.attention!r}")
        if self.architecture not in ("qwen2", "llama"):
            problems.append(f"architecture must be 'qwen2' or 'llama', got {self.architecture!r}")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def replace(self, **kwargs: Any) -> "ModelConfig":
        """Returns a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **kwargs)

    @property
    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        q = d * self.num_heads * self.head_dim
        kv = 2 * d * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * d
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        layer = q + kv + o + bias + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return l * layer + emb + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per MAC), including attention over `seq_len` keys."""
        d, l = self.hidden_size, self.num_layers
        # The embedding lookup is no matmul; the lm head (tied or not) is one d x V matmul.
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        matmul_params = self.num_params - embeddings + self.vocab_size * d
        matmul_params -= l * 2 * d + d  # norms are not matmuls
        attn = 2 * 2 * l * self.num_heads * self.head_dim * seq_len / 2  # causal: half the keys
        return 2.0 * matmul_params + attn


def _qwen(vocab, d, f, layers, heads, kv, tie, theta=1_000_000.0, max_pos=32768, eps=1e-6, **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=d // heads, rope_theta=theta,
                       rms_norm_eps=eps, tie_word_embeddings=tie, max_position_embeddings=max_pos,
                       attention_bias=True, architecture="qwen2", hf_torch_dtype="bfloat16",
                       bos_token_id=151643, eos_token_id=151643, **kw)


# Official configs (config.json of each Qwen/Qwen2.5-* base checkpoint).
PRESETS = {
    "qwen2.5-0.5b": lambda: _qwen(151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": lambda: _qwen(151936, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": lambda: _qwen(151936, 2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": lambda: _qwen(152064, 3584, 18944, 28, 28, 4, False, max_pos=131072),
    "qwen2.5-14b": lambda: _qwen(152064, 5120, 13824, 48, 40, 8, False, max_pos=131072, eps=1e-5),
    "qwen2.5-32b": lambda: _qwen(152064, 5120, 27648, 64, 40, 8, False, max_pos=131072, eps=1e-5),
    "qwen2.5-72b": lambda: _qwen(152064, 8192, 29568, 80, 64, 8, False, max_pos=131072, eps=1e-5),
    "qwen2.5-math-1.5b": lambda: _qwen(151936, 1536, 8960, 28, 12, 2, True, theta=10000.0,
                                       max_pos=4096),
    "qwen2.5-math-7b": lambda: _qwen(152064, 3584, 18944, 28, 28, 4, False, theta=10000.0,
                                     max_pos=4096),
    # Tiny shapes for tests and the CPU demo.
    "tiny": lambda: ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                                tie_word_embeddings=True, max_position_embeddings=2048),
    # The CPU demo's policy (configs/toy.py): big enough to learn multi-step toy arithmetic.
    "toy": lambda: ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                               num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
                               tie_word_embeddings=True, max_position_embeddings=2048),
    "tiny-untied": lambda: ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                                       num_layers=3, num_heads=8, num_kv_heads=8, head_dim=8,
                                       rope_theta=10000.0, tie_word_embeddings=False,
                                       max_position_embeddings=2048),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named size preset (see `PRESETS`), with optional field overrides."""
    key = name.lower().replace("_", "-").replace("qwen2p5", "qwen2.5")
    if key not in PRESETS:
        raise UserError(f"Unknown model preset {name!r}. Choose one of: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[key]()
    return cfg.replace(**overrides) if overrides else cfg


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a HF config.json dict (Qwen2ForCausalLM or LlamaForCausalLM)."""
    model_type = hf.get("model_type", "qwen2")
    if model_type not in ("qwen2", "llama", "mistral"):
        raise UserError(f"Unsupported model_type {model_type!r} in config.json: dapo_jax loads "
                        "qwen2 (Qwen2/Qwen2.5) and llama-family checkpoints")
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers 5 moved it into rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in (None, "default"):
        raise UserError(f"rope scaling type {rope_type!r} is not supported yet; only default RoPE")
    heads = hf["num_attention_heads"]
    arch = "llama" if model_type in ("llama", "mistral") else "qwen2"
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=float(rope_theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        max_position_embeddings=hf.get("max_position_embeddings", 32768), architecture=arch,
        hf_torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Returns the HF config.json dict for `cfg` (Qwen2ForCausalLM or LlamaForCausalLM)."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu", torch_dtype=cfg.hf_torch_dtype, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, use_cache=True,
    )
    if cfg.architecture == "llama":
        common.update(model_type="llama", architectures=["LlamaForCausalLM"],
                      attention_bias=cfg.attention_bias, mlp_bias=False)
    else:
        if not cfg.attention_bias:
            raise ValueError("Qwen2 checkpoints always have attention biases; use architecture='llama'")
        common.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    return common
