"""The SwiGLU MLP, down(silu(x @ gate) * (x @ up)), with a hand-written backward pass.

Why not autodiff: for the weight gradients (x^T dG, x^T dU, a^T dY: contractions over every token)
XLA:CPU lays out an operand feature-major, and autodiff's backward fuses that transpose into the
elementwise SiLU derivative, a strided loop over [tokens, intermediate] that took several times as
long as the matmuls next to it (docs/benchmarks.md, the `dapo_step` profile). Here the weight
gradients contract flattened [tokens, features] matrices whose narrow side is the transposed one,
and the SiLU derivative is a plain elementwise pass. Values and gradients equal autodiff's
(tests/test_swiglu.py); the residuals are x, x @ gate and x @ up, as autodiff keeps.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

Constrain = Callable[[jax.Array], jax.Array]


def _identity(x: jax.Array) -> jax.Array:
    return x


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., n] @ w [n, m] -> [..., m]."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dot_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., m] @ w[n, m]^T -> [..., n]."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _over_tokens(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum over tokens of a[..., i] b[..., j] -> [i, j] (tokens flattened to one axis)."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               constrain: Constrain = _identity) -> jax.Array:
    """down(silu(x @ w_gate) * (x @ w_up)) for x [..., D], w_gate/w_up [D, F], w_down [F, D].

    `constrain` is applied to the [..., F] activation (a sharding constraint, for example); it
    must be an identity on values.
    """
    return _forward(x, w_gate, w_up, w_down, constrain)[0]


def _forward(x, w_gate, w_up, w_down, constrain):
    g, u = _dot(x, w_gate), _dot(x, w_up)
    return _dot(constrain(jax.nn.silu(g) * u), w_down), (x, g, u, w_gate, w_up, w_down)


def _backward(constrain, res, dy):
    x, g, u, w_gate, w_up, w_down = res
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    da = constrain(_dot_t(dy, w_down))  # d(activation) [..., F]
    du = da * silu
    dg = da * u * (sig * (1 + g * (1 - sig)))  # silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
    dx = _dot_t(dg, w_gate) + _dot_t(du, w_up)
    return (dx, _over_tokens(x, dg).astype(w_gate.dtype), _over_tokens(x, du).astype(w_up.dtype),
            _over_tokens(silu * u, dy).astype(w_down.dtype))


swiglu_mlp.defvjp(_forward, _backward)
