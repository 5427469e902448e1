"""How the sampler lays out the policy's weights for decoding, and the matmuls that go with each layout.

The model (`models.qwen2`) knows one weight layout, the training one: kernels [*in, *out], layers
stacked on a leading axis. Decoding is a different workload (a few rows of activations against every
weight, once per step), and two layout changes make it faster without changing a single number:

- **per-layer weights**: one array per layer instead of stacked ones. XLA:CPU/GPU copy a layer's slice
  out of stacked weights before each matmul, which a decode step pays for in full; separate arrays are
  read in place. 10-35% faster decode steps on CPU (docs/benchmarks.md); compile time grows linearly
  with depth, like an unrolled loop.
- **out-major kernels**: kernels stored [*out, *in] (and an untied lm head [V, D], like the embedding),
  every matmul computed as W x^T. XLA:CPU's dot streams a large weight up to 2x faster as the left
  operand when x has few rows. Measured on CPU only; on GPU/TPU the compiler picks layouts itself.

A `DecodeLayout` owns everything that depends on that choice: converting training-layout parameters
(`convert`), the layout's shapes, logical axes and shardings (for the engine's jit boundaries and the
memory planner), the matmul the decoder runs with (`matmul`, injected into `decoder_apply`) and the
lm-head logits the sampler draws from (`logits`). Config `rollout.decode_layout` picks one by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import (KERNEL_INPUT_DIMS, Params, jnp_dtype, lm_logits,
                                   param_logical_axes, param_shapes, project)
from dapo_jax.models.sharding import named_sharding


def project_out_major(x: jax.Array, w: jax.Array, n_in: int, *,
                      preferred_element_type: Any = None) -> jax.Array:
    """x [..., *in] times a kernel stored [*out, *in] -> [..., *out], computed as W x^T.

    The dot yields [*out, ...]; it is transposed behind an optimization barrier because without one
    XLA's algebraic simplifier folds the transpose back into the dot (and loses the speed-up).
    """
    n_out = w.ndim - n_in
    y = jax.lax.dot_general(
        w, x, ((tuple(range(n_out, w.ndim)), tuple(range(x.ndim - n_in, x.ndim))), ((), ())),
        preferred_element_type=preferred_element_type)
    y = jax.lax.optimization_barrier(y)
    return jnp.moveaxis(y, tuple(range(n_out)), tuple(range(y.ndim - n_out, y.ndim)))


def transpose_kernels(tree: Any, cfg: ModelConfig) -> Any:
    """The parameters (or their shapes / logical axes) with out-major kernels.

    Layer kernels become [*out, *in] (after the leading layer axis when stacked) and an untied lm head
    [V, D]. Array leaves are transposed; tuples (shapes, logical axes) are permuted as sequences, so
    shardings follow the same layout.
    """
    def perm(x, axes):
        return tuple(x[i] for i in axes) if isinstance(x, tuple) else jnp.transpose(x, axes)

    def layer(lp, lead):
        out = dict(lp)
        for name, n_in in KERNEL_INPUT_DIMS.items():
            x = lp[name]
            ndim = len(x) if isinstance(x, tuple) else x.ndim
            dims = list(range(lead, ndim))
            axes = tuple(range(lead)) + tuple(dims[n_in:] + dims[:n_in])
            out[name] = perm(x, axes)
        return out

    layers = tree["layers"]
    new = dict(tree, layers=tuple(layer(lp, 0) for lp in layers)
               if isinstance(layers, (list, tuple)) else layer(layers, 1))
    if not cfg.tie_word_embeddings:
        new["lm_head"] = perm(tree["lm_head"], (1, 0))
    return new


def unstack_layers(params: Params) -> Params:
    """The same parameters with `layers` as a tuple of per-layer dicts instead of stacked arrays."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    num = jax.tree.leaves(layers)[0].shape[0]
    return dict(params, layers=tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num)))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """The sampler's weight layout: `per_layer` arrays (else stacked), `out_major` kernels (else
    [in, out] as in training). Floating weights are always held in the compute dtype."""

    per_layer: bool
    out_major: bool

    @property
    def name(self) -> str:
        """The layout's `rollout.decode_layout` name."""
        return ("per_layer" if self.per_layer else "stacked") + ("_out_major" if self.out_major else "")

    # -- shapes, logical axes, shardings ----------------------------------------------------------
    def _stacked(self, tree: Any, cfg: ModelConfig) -> Any:
        return transpose_kernels(tree, cfg) if self.out_major else tree

    def _per_layer(self, layers: Mapping[str, Any], cfg: ModelConfig, drop_lead) -> Any:
        return tuple({k: drop_lead(v) for k, v in layers.items()} for _ in range(cfg.num_layers))

    def shapes(self, cfg: ModelConfig) -> Params:
        """Shape tuples of the parameters in this layout, shaped like them."""
        shapes = self._stacked(param_shapes(cfg), cfg)
        if self.per_layer:
            shapes = dict(shapes, layers=self._per_layer(shapes["layers"], cfg, lambda s: s[1:]))
        return shapes

    def shardings(self, cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any]) -> Params:
        """NamedShardings of the parameters in this layout, from their logical axes and `rules`.

        A per-layer array gets its stacked counterpart's spec without the leading (layers) entry.
        """
        stacked_shapes = self._stacked(param_shapes(cfg), cfg)
        sh = jax.tree.map(lambda a, s: named_sharding(mesh, a, s, rules),
                          self._stacked(param_logical_axes(cfg), cfg), stacked_shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
        if self.per_layer:
            sh = dict(sh, layers=self._per_layer(
                sh["layers"], cfg, lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:]))))
        return sh

    def abstract(self, cfg: ModelConfig, shardings: Params | None = None) -> Params:
        """ShapeDtypeStructs of the parameters in this layout (with `shardings` when given)."""
        dt = jnp_dtype(cfg.dtype)
        shapes = self.shapes(cfg)
        if shardings is None:
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes, is_leaf=_is_shape)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh), shapes,
                            shardings, is_leaf=_is_shape)

    def holds(self, params: Params, cfg: ModelConfig) -> bool:
        """Whether `params` already has this layout's structure, shapes and dtypes."""
        want = self.abstract(cfg)
        if jax.tree.structure(params) != jax.tree.structure(want):
            return False
        if not all(np.shape(x) == w.shape and x.dtype == w.dtype
                   for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
            return False
        # A degenerate config whose transposed kernels keep their shapes: take it as training layout.
        return not (self.out_major and
                    param_shapes(cfg) == transpose_kernels(param_shapes(cfg), cfg))

    # -- conversion --------------------------------------------------------------------------
    def check_input(self, params: Params) -> None:
        """Raises if `params` cannot be converted to this layout."""
        if isinstance(params["layers"], (list, tuple)) and not self.per_layer:
            raise ValueError(f"per-layer parameters given to an engine with decode layout "
                             f"{self.name!r}, which keeps layers stacked; pass the stacked "
                             "(training) layout")

    def convert(self, params: Params, cfg: ModelConfig) -> Params:
        """Training-layout parameters (stacked, or already per-layer) in this layout (traceable)."""
        self.check_input(params)
        dt = jnp_dtype(cfg.dtype)
        p = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         params)
        if self.out_major:
            p = transpose_kernels(p, cfg)
        return unstack_layers(p) if self.per_layer else p

    # -- decode math -------------------------------------------------------------------------
    @property
    def matmul(self) -> Callable[..., jax.Array]:
        """The `matmul(x, w, n_in)` for `decoder_apply` with parameters in this layout."""
        return project_out_major if self.out_major else project

    def logits(self, params: Params, cfg: ModelConfig, hidden: jax.Array
               ) -> tuple[jax.Array, int]:
        """(float32 logits, vocab axis) for hidden states [B, D] of parameters in this layout.

        Out-major: W h^T, [V, B] with the vocabulary first, for the sampler to reduce over axis 0
        without a [V, B] -> [B, V] transpose (20 ms per step at batch 64 on CPU). Else [B, V].
        """
        if not self.out_major:
            return lm_logits(params, cfg, hidden), -1
        w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
        return jax.lax.dot_general(w.astype(jnp_dtype(cfg.dtype)), hidden, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32), 0


DECODE_LAYOUTS: dict[str, DecodeLayout] = {
    layout.name: layout for layout in (DecodeLayout(True, True), DecodeLayout(True, False),
                                       DecodeLayout(False, True), DecodeLayout(False, False))}
# Values of config `rollout.decode_layout`.
DECODE_LAYOUT_CHOICES = ("auto",) + tuple(DECODE_LAYOUTS)


def resolve_decode_layout(layout: str | DecodeLayout, platform: str) -> DecodeLayout:
    """The layout named `layout` ("auto" or a key of DECODE_LAYOUTS) for a mesh of `platform` devices.

    "auto": per-layer weights everywhere, out-major kernels on CPU only (where they were measured).
    """
    if isinstance(layout, DecodeLayout):
        return layout
    if layout == "auto":
        return DecodeLayout(per_layer=True, out_major=platform == "cpu")
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"unknown decode layout {layout!r}; choose one of "
                         f"{list(DECODE_LAYOUT_CHOICES)}")
    return DECODE_LAYOUTS[layout]
