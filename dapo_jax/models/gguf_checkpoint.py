"""GGUF files (llama.cpp) as Hugging Face checkpoints: config, dequantised tensors, tokenizer.

`read_config` gives the config.json a HF conversion would have, and `GGUFTensors` serves every tensor
under its HF name in HF's torch layout, dequantised to float32, so `load_pretrained` loads a GGUF file
with the same code that loads safetensors. Qwen2 ('qwen2') and Llama ('llama') files are supported.

llama.cpp's converter permutes the rows of Llama's q/k projections (interleaved rotary pairs instead
of HF's rotate-half halves); `_unpermute` undoes it. Qwen2 files are stored unpermuted.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from dapo_jax.runtime.cli_errors import UserError

ARCHITECTURES = ("qwen2", "llama")

_LAYER_NAMES = {  # GGUF per-layer suffix -> HF per-layer suffix
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _require_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in requirements.txt
        raise ImportError("reading .gguf checkpoints needs the `gguf` package: pip install "
                          "'gguf>=0.19,<0.20' (it is in requirements.txt)") from e
    return gguf


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    return _require_gguf().GGUFReader(path)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name (None for tensors we do not load, e.g. rope_freqs)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, suffix = gguf_name.split(".", 2)
        if suffix in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    return None


def gguf_name(hf_tensor_name: str) -> str:
    """The GGUF tensor name of a HF tensor name (inverse of `hf_name`; the HF name when unknown)."""
    for g, h in _TOP_NAMES.items():
        if h == hf_tensor_name:
            return g
    if hf_tensor_name.startswith("model.layers."):
        _, _, layer, suffix = hf_tensor_name.split(".", 3)
        for g, h in _LAYER_NAMES.items():
            if h == suffix:
                return f"blk.{layer}.{g}"
    return hf_tensor_name


def missing_tensor_error(path: str | os.PathLike, hf_names: list[str]) -> UserError:
    """The user error for a GGUF file that lacks tensors the model needs (HF names given)."""
    first = hf_names[0]
    more = f" (and {len(hf_names) - 1} more)" if len(hf_names) > 1 else ""
    return UserError(f"{os.fspath(path)}: the GGUF file has no tensor {gguf_name(first)!r} ({first} "
                     f"in Hugging Face naming){more}, which its metadata's architecture needs: the "
                     "file is incomplete or was converted from another model; convert or download "
                     "it again")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config.json dict of the model in a GGUF file (what `from_hf_config` reads)."""
    r = _reader(os.fspath(path))
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; dapo_jax loads "
                        f"{' and '.join(ARCHITECTURES)} GGUF files")
    names = {t.name: t for t in r.tensors}
    embed = names.get("token_embd.weight")
    if embed is None:
        raise missing_tensor_error(path, ["model.embed_tokens.weight"])
    hidden = int(_field(r, f"{arch}.embedding_length"))
    heads = int(_field(r, f"{arch}.attention.head_count"))
    kv_heads = int(_field(r, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(r, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = _field(r, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UserError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head "
                        f"dim {head_dim}) are not supported")
    if _field(r, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UserError(f"{path}: rope scaling {_field(r, f'{arch}.rope.scaling.type')!r} is not "
                        "supported yet; only default RoPE")
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    return {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": int(_field(r, f"{arch}.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(r, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(r, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rope_theta": float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_field(r, f"{arch}.context_length", 32768)),
        # llama.cpp omits output.weight when the head is tied to the embeddings.
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        # Dequantised weights are float32; export writes that unless told otherwise.
        "torch_dtype": "float32",
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute on q/k rows (or biases).

    llama.cpp stores each head's rows as interleaved rotary pairs (r0, r_half, r1, r_half+1, ...);
    HF keeps the two halves apart (rotate-half), so row 2i+j of a head goes back to j*half + i.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """HF-named, float32, torch-layout tensors of a GGUF file; the reader `load_pretrained` uses."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = _reader(self.path)
        self.config = read_config(self.path)
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self):
        return self._tensors.keys()

    @functools.lru_cache(maxsize=2)  # the shards of one tensor are read one after another
    def get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise missing_tensor_error(self.path, [name])
        gguf = _require_gguf()
        t = self._tensors[name]
        # GGUF lists dims fastest-first, so the numpy shape is HF's torch shape ([out, in]).
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.config["model_type"] == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute(w, self.config["num_attention_heads"])
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute(w, self.config["num_key_value_heads"])
        return w


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file."""
    from transformers import AutoTokenizer

    _require_gguf()
    path = os.fspath(path)
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                         gguf_file=os.path.basename(path))
