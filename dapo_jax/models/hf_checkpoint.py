"""Hugging Face checkpoint <-> sharded NNX model: load straight into shardings, export back.

Loading never builds the model on one host: every device shard is read from the safetensors files
(memory-mapped when local, byte ranges through gcsfs when on gs://), slicing only the rows/columns it
owns; each layer's tensor is opened once for all of a host's devices.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from dapo_jax.models import config as config_lib
from dapo_jax.models import gguf_checkpoint, sources
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import Params, Qwen2, jnp_dtype, param_logical_axes, param_shapes
from dapo_jax.models.safetensors_io import CheckpointReader, save_file
from dapo_jax.models.sharding import make_mesh, named_sharding
from dapo_jax.runtime.cli_errors import MissingFileError, UserError

log = logging.getLogger(__name__)

_LAYER = "model.layers.{i}."
# Our stacked name -> (HF per-layer tensor name, kind). Kinds say how HF's torch layout maps to ours.
_LAYER_MAP = {
    "input_norm": ("input_layernorm.weight", "same"),
    "post_norm": ("post_attention_layernorm.weight", "same"),
    "q_kernel": ("self_attn.q_proj.weight", "in_heads"),
    "k_kernel": ("self_attn.k_proj.weight", "in_heads"),
    "v_kernel": ("self_attn.v_proj.weight", "in_heads"),
    "q_bias": ("self_attn.q_proj.bias", "heads"),
    "k_bias": ("self_attn.k_proj.bias", "heads"),
    "v_bias": ("self_attn.v_proj.bias", "heads"),
    "o_kernel": ("self_attn.o_proj.weight", "heads_out"),
    "gate_kernel": ("mlp.gate_proj.weight", "transpose"),
    "up_kernel": ("mlp.up_proj.weight", "transpose"),
    "down_kernel": ("mlp.down_proj.weight", "transpose"),
}
_TOP_MAP = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "transpose"),
}


def _norm(idx: tuple, shape: tuple) -> tuple[slice, ...]:
    out = []
    for s, n in zip(idx, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("strided shard indices are not supported")
        out.append(slice(start, stop))
    return tuple(out)


def _read(tensor: np.ndarray, kind: str, idx: tuple[slice, ...], our_shape: tuple) -> np.ndarray:
    """Reads the part of HF `tensor` that lands at `idx` of our layout (shape `our_shape`)."""
    if kind == "same":
        return np.asarray(tensor[idx])
    if kind == "transpose":  # ours [a, b] = hf[b, a].T
        return np.asarray(tensor[idx[1], idx[0]]).T
    hd = our_shape[-1] if kind != "heads_out" else our_shape[1]
    if kind == "heads":  # ours [H, hd] = hf[H*hd]
        sh, sd = idx
        block = np.asarray(tensor[sh.start * hd:sh.stop * hd]).reshape(-1, hd)
        return block[:, sd]
    if kind == "in_heads":  # ours [D, H, hd] = hf[H*hd, D].T
        sd, sh, sk = idx
        block = np.asarray(tensor[sh.start * hd:sh.stop * hd, sd])  # [h*hd, d]
        return block.T.reshape(block.shape[1], -1, hd)[:, :, sk]
    if kind == "heads_out":  # ours [H, hd, D] = hf[D, H*hd].T
        sh, sk, sd = idx
        block = np.asarray(tensor[sd, sh.start * hd:sh.stop * hd])  # [d, h*hd]
        return block.T.reshape(-1, hd, block.shape[0])[:, sk, :]
    raise ValueError(kind)


def _to_hf(arr: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of `_read` for a whole (per-layer) tensor."""
    if kind == "same":
        return arr
    if kind == "transpose":
        return arr.T
    if kind == "heads":
        return arr.reshape(-1)
    if kind == "in_heads":
        return arr.reshape(arr.shape[0], -1).T
    if kind == "heads_out":
        return arr.reshape(-1, arr.shape[-1]).T
    raise ValueError(kind)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """NamedShardings for every parameter (nested dict shaped like the params)."""
    axes, shapes = param_logical_axes(cfg), param_shapes(cfg)
    return jax.tree.map(lambda a, s: named_sharding(mesh, a, s, rules), axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _default_mesh(mesh: Mesh | None) -> Mesh:
    return mesh if mesh is not None else make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                   devices=jax.devices()[:1])


def model_from_params(cfg: ModelConfig, params: Params) -> Qwen2:
    """Wraps a parameter dict (possibly sharded) in the NNX module without copying."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state)


def init_model(cfg: ModelConfig, *, mesh: Mesh | None = None, seed: int = 0,
               rules: Mapping[str, Any] | None = None) -> Qwen2:
    """A randomly initialised model whose parameters are created directly in their shardings."""
    mesh = _default_mesh(mesh)
    shardings = param_shardings(cfg, mesh, rules)

    def create():
        return Qwen2(cfg, rngs=nnx.Rngs(seed)).params()

    params = jax.jit(create, out_shardings=shardings)()
    return model_from_params(cfg, params)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config.json dict of a checkpoint: a HF directory, a .gguf file or a Hub id."""
    source = sources.resolve(path)
    if source.is_gguf:
        return gguf_checkpoint.read_config(source.local)
    cfg_path = epath.Path(source.local) / "config.json"
    if not cfg_path.exists():
        raise MissingFileError(f"{cfg_path} not found: load_pretrained expects a Hugging Face "
                               "checkpoint directory (config.json + *.safetensors), a .gguf file "
                               "or a Hub id; point model.path (or --checkpoint) at one")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}): the checkpoint's config.json is "
                        "corrupt; download the checkpoint again") from e


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None, compute_dtype: str | None = None,
                    **config_overrides: Any) -> tuple[Qwen2, ModelConfig]:
    """Loads a Qwen2/Llama checkpoint straight into a sharded model.

    `path` is a HF directory (local or gs://), a .gguf file (dequantised to `dtype`) or a Hub id; see
    `sources.resolve`. `dtype` is the parameter storage dtype and `compute_dtype` the matmul dtype (default: float32);
    `config_overrides` set other ModelConfig fields (remat, scan_layers...). Returns (model, config).
    """
    source = sources.resolve(path)
    if compute_dtype is not None:
        config_overrides["dtype"] = compute_dtype
    config_overrides.pop("param_dtype", None)
    reader: Any
    if source.is_gguf:
        reader = gguf_checkpoint.GGUFTensors(source.local)
        cfg = config_lib.from_hf_config(reader.config, param_dtype=dtype, **config_overrides)
    else:  # the config first: an unsupported model_type says so before any tensor is opened
        cfg = config_lib.from_hf_config(read_hf_config(source.local), param_dtype=dtype,
                                        **config_overrides)
        reader = CheckpointReader(source.local)
    mesh = _default_mesh(mesh)
    shardings = param_shardings(cfg, mesh, rules)
    shapes = param_shapes(cfg)
    target = jnp_dtype(dtype)

    def build(name: str, hf_name: str | Callable[[int], str], kind: str, shape: tuple,
              stacked: bool) -> jax.Array:
        sharding = shardings["layers"][name] if stacked else shardings[name]
        if not stacked:
            return jax.make_array_from_callback(
                shape, sharding,
                lambda index: _read(reader.get(hf_name), kind, _norm(index, shape), shape
                                    ).astype(target))
        # Stacked layers, layer by layer: each layer's tensor is opened once for all of this host's
        # devices, so a remote (ranged) read or a GGUF dequantisation happens once per layer, not
        # once per device, whichever axis the devices split.
        indices = {d: _norm(idx, shape)
                   for d, idx in sharding.addressable_devices_indices_map(shape).items()}
        local = {d: np.empty([s.stop - s.start for s in idx], target)
                 for d, idx in indices.items()}
        for i in range(shape[0]):
            users = [d for d, idx in indices.items() if idx[0].start <= i < idx[0].stop]
            if users:
                tensor = reader.get(hf_name(i))
                for d in users:
                    local[d][i - indices[d][0].start] = _read(tensor, kind, indices[d][1:],
                                                              shape[1:])
        return jax.make_array_from_single_device_arrays(
            shape, sharding, [jax.device_put(local[d], d) for d in indices])

    # Every tensor the config's architecture needs, checked before any is read.
    needed = [hf for name, (hf, _) in _TOP_MAP.items() if name in shapes]
    needed += [_LAYER.format(i=i) + _LAYER_MAP[name][0] for name in shapes["layers"]
               for i in range(cfg.num_layers)]
    missing = [n for n in needed if n not in reader]
    if missing and source.is_gguf:
        raise gguf_checkpoint.missing_tensor_error(source.local, missing)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        why = (" (config.json has tie_word_embeddings=false)" if missing[0] == "lm_head.weight"
               else "")
        raise UserError(f"{path}: the checkpoint has no tensor {missing[0]!r}{why}{more}, which its "
                        "config.json's architecture needs: the safetensors files are incomplete or "
                        "from another model; download the checkpoint again")
    params: Params = {"layers": {}}
    for name, (hf_name, kind) in _TOP_MAP.items():
        if name not in shapes:
            continue
        params[name] = build(name, hf_name, kind, shapes[name], stacked=False)
    for name, shape in shapes["layers"].items():
        suffix, kind = _LAYER_MAP[name]
        params["layers"][name] = build(
            name, lambda i, s=suffix: _LAYER.format(i=i) + s, kind, shape, stacked=True)
    return model_from_params(cfg, params), cfg


def _host_array(x: jax.Array) -> np.ndarray:
    """Gathers a (possibly multi-host sharded) array to a numpy array on every host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_state_dict(params: Params, cfg: ModelConfig, dtype: str | None = None
                  ) -> dict[str, np.ndarray]:
    """The HF-named tensors of `params` as numpy arrays in `dtype` (default: the checkpoint's)."""
    out_dtype = np.dtype(jnp_dtype(dtype or cfg.hf_torch_dtype))
    tensors: dict[str, np.ndarray] = {}
    for name, (hf_name, kind) in _TOP_MAP.items():
        if name in params:
            tensors[hf_name] = _to_hf(_host_array(params[name]), kind).astype(out_dtype)
    for name, stacked in params["layers"].items():
        suffix, kind = _LAYER_MAP[name]
        host = _host_array(stacked)
        for i in range(cfg.num_layers):
            tensors[_LAYER.format(i=i) + suffix] = np.ascontiguousarray(
                _to_hf(host[i], kind).astype(out_dtype))
    return tensors


def save_pretrained(model: Qwen2 | Params, model_config: ModelConfig, path: str | os.PathLike, *,
                    dtype: str | None = None, max_shard_bytes: int = 4 * 2**30,
                    tokenizer_dir: str | os.PathLike | None = None,
                    generation_config: Mapping[str, Any] | None = None) -> None:
    """Writes a HF checkpoint directory (local or gs://) that `AutoModelForCausalLM.from_pretrained`
    loads.

    Tensors are written in `dtype` (default: the dtype the checkpoint was loaded from), split into
    files of at most `max_shard_bytes` with an index; only process 0 writes (all hosts gather).
    `tokenizer_dir` (a folder or .gguf file) supplies the tokenizer files and `generation_config`
    the generation_config.json (e.g. every stop token as `eos_token_id`, see `dapo_jax.export`).
    """
    params = model.params() if isinstance(model, Qwen2) else model
    tensors = hf_state_dict(params, model_config, dtype)
    if jax.process_index() != 0:
        return
    out_dtype = dtype or model_config.hf_torch_dtype
    local = tempfile.mkdtemp(prefix="dapo_jax_export_")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(local, "model.safetensors"))
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(local, fname))
            weight_map.update({k: fname for k in shard})
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(local, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = config_lib.to_hf_config(model_config)
    hf_cfg["torch_dtype"] = out_dtype
    with open(os.path.join(local, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if generation_config is not None:
        with open(os.path.join(local, "generation_config.json"), "w") as f:
            json.dump(dict(generation_config), f, indent=2)
    if tokenizer_dir is not None and sources.is_gguf_path(tokenizer_dir):
        gguf_checkpoint.load_tokenizer(sources.resolve(tokenizer_dir).local).save_pretrained(local)
    elif tokenizer_dir is not None:
        for f in epath.Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(os.fspath(f), local) if not str(f).startswith("gs://") else \
                    f.copy(epath.Path(local) / f.name)
    dest = epath.Path(path)
    dest.mkdir(parents=True, exist_ok=True)
    # config.json last: its presence marks a complete checkpoint (the warm-start cache test).
    for f in sorted(os.listdir(local), key=lambda name: name == "config.json"):
        epath.Path(local, f).copy(dest / f, overwrite=True)
    shutil.rmtree(local, ignore_errors=True)
