"""swiglu_mlp: values and gradients equal autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.models.swiglu import swiglu_mlp


def _plain(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def _inputs(dtype, shape=(3, 5, 8), f=12, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    d = shape[-1]
    x = jax.random.normal(k[0], shape, jnp.float32).astype(dtype)
    wg, wu = (jax.random.normal(k[i], (d, f), jnp.float32).astype(dtype) * 0.5 for i in (1, 2))
    wd = (jax.random.normal(k[3], (f, d), jnp.float32) * 0.5).astype(dtype)
    dy = jax.random.normal(k[4], shape, jnp.float32).astype(dtype)
    return x, wg, wu, wd, dy


@pytest.mark.parametrize("shape", [(3, 5, 8), (7, 8), (2, 3, 4, 8)])
def test_values_and_gradients_match_autodiff_float32(shape):
    x, wg, wu, wd, dy = _inputs(jnp.float32, shape)
    ours, vjp = jax.vjp(jax.jit(swiglu_mlp), x, wg, wu, wd)
    ref, ref_vjp = jax.vjp(_plain, x, wg, wu, wd)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    for got, want, name in zip(vjp(dy), ref_vjp(dy), ("x", "gate", "up", "down")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_gradients_keep_dtype_and_track_float32():
    x, wg, wu, wd, dy = _inputs(jnp.bfloat16)
    grads = jax.vjp(swiglu_mlp, x, wg, wu, wd)[1](dy)
    f32 = [a.astype(jnp.float32) for a in (x, wg, wu, wd, dy)]
    ref = jax.vjp(_plain, *f32[:4])[1](f32[4])
    for got, want in zip(grads, ref):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.05 * scale


def test_constrain_is_applied_to_the_activation_both_ways():
    seen = []

    def constrain(a):
        seen.append(a.shape)
        return a

    x, wg, wu, wd, dy = _inputs(jnp.float32)
    jax.vjp(lambda *a: swiglu_mlp(*a, constrain), x, wg, wu, wd)[1](dy)
    assert seen == [(3, 5, 12), (3, 5, 12)]  # forward activation, backward d(activation)


def test_under_remat_and_scan_gradients_match():
    x, wg, wu, wd, dy = _inputs(jnp.float32)
    ws = jnp.stack([wg, wg * 0.5]), jnp.stack([wu, -wu]), jnp.stack([wd, wd * 2])

    def stack(fn, policy):
        def body(h, w):
            return fn(h, *w) + h, None
        body = jax.checkpoint(body, policy=policy) if policy else body
        return lambda x, ws: jnp.sum(jax.lax.scan(body, x, ws)[0] * dy)

    ref = jax.grad(stack(_plain, None), argnums=(0, 1))(x, ws)
    for policy in (None, jax.checkpoint_policies.nothing_saveable,
                   jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
        got = jax.jit(jax.grad(stack(swiglu_mlp, policy), argnums=(0, 1)))(x, ws)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):  # two layers: values ~10
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
