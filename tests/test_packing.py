"""Packed sequences (dapo_jax.training.packing) against the unpacked [prompt P | response R] layout.

The reference for every number is the trainer's unpacked path: `batching.pad_rows` rows through
`sequence_logprobs` and `algo.compute_policy_loss`. Shapes are fixed (N samples, rows of L tokens)
so each jitted function compiles once; hypothesis varies only the lengths and contents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_jax import models
from dapo_jax.algo import LOSS_AGG_MODES, compute_policy_loss
from dapo_jax.models.config import preset
from dapo_jax.models.logprobs import sequence_logprobs
from dapo_jax.training import batching, packing

TOL = dict(rtol=1e-5, atol=1e-5)
N, P, R = 8, 6, 10  # samples, max prompt, max response
L = P + R  # packed row length: any sample fits; rows = N covers the worst case
SMALL = settings(max_examples=15, deadline=None)


def _reference_ffd(lengths, row_length):
    """First-fit decreasing written out with lists: rows of (sample, length) in placement order."""
    rows = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row in rows:
            if sum(n for _, n in row) + lengths[i] <= row_length:
                row.append((i, lengths[i]))
                break
        else:
            rows.append([(i, lengths[i])])
    return [[i for i, _ in row] for row in rows]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(40, 64))
def test_ffd_places_every_sample_once_within_the_row_in_first_fit_decreasing_order(lengths, width):
    plan = packing.pack(lengths, width)
    assert plan.rows() == _reference_ffd(lengths, width)
    used = np.zeros((plan.num_rows, width), int)
    for i, n in enumerate(lengths):
        assert plan.offset[i] + n <= width
        used[plan.row[i], plan.offset[i]:plan.offset[i] + n] += 1
    assert used.max() == 1 and used.sum() == sum(lengths)  # each sample once, no overlap
    for row in plan.rows():  # segments 1..k along the row, samples back to back
        assert [plan.segment[i] for i in row] == list(range(1, len(row) + 1))
        assert [plan.offset[i] for i in row] == list(np.cumsum([0] + [lengths[i] for i in row])[:-1])
    assert plan.fill == pytest.approx(sum(lengths) / (plan.num_rows * width))


def test_a_sample_longer_than_the_row_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sample 2 has 30 tokens.*row_length 20"):
        packing.pack([5, 20, 30, 1], 20)
    plan = packing.pack([3, 3], 8)
    with pytest.raises(ValueError, match="empty prompt"):
        packing.packed_rows([[], [1, 2]], [[1, 2, 3], [4]], plan)
    with pytest.raises(ValueError, match="needs 1 rows"):
        packing.packed_rows([[1], [2]], [[1, 2], [3, 4]], plan, num_rows=0)


def _samples(draw_lengths, seed):
    """N (prompt, response) pairs with the drawn lengths, random tokens of the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 512, p).tolist() for p, _ in draw_lengths]
    responses = [rng.integers(1, 512, r).astype(np.int32) for _, r in draw_lengths]
    return prompts, responses


LENGTHS = st.lists(st.tuples(st.integers(1, P), st.integers(0, R)), min_size=N, max_size=N)


@SMALL
@given(LENGTHS, st.integers(0, 2**16))
def test_pack_then_unpack_returns_every_token_to_its_sample(lengths, seed):
    prompts, responses = _samples(lengths, seed)
    plan = packing.pack([p + r for p, r in lengths], L)
    rows = packing.packed_rows(prompts, responses, plan, num_rows=N)
    r_len = np.array([r for _, r in lengths])
    values = np.random.default_rng(seed).normal(size=(N, R)).astype(np.float32)
    values[np.arange(R)[None] >= r_len[:, None]] = 0.0
    packed = packing.place_per_token(values, rows)
    np.testing.assert_array_equal(packing.unpack_tokens(packed, plan, r_len, R), values)
    flat, valid = packing.unpack_indices(plan, r_len, R)
    np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack_tokens_jnp)(packed, flat, valid)),
                                  values)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        where = rows["sample_index"] == i
        np.testing.assert_array_equal(rows["input_ids"][where], prompt + response.tolist())
        np.testing.assert_array_equal(rows["positions"][where], np.arange(len(prompt) + len(response)))
        assert set(rows["segment_ids"][where]) == {plan.segment[i]}
        np.testing.assert_array_equal(rows["response_index"][where & (rows["response_mask"] > 0)],
                                      np.arange(len(response)))
    assert ((rows["segment_ids"] == 0) == (rows["sample_index"] < 0)).all()
    np.testing.assert_array_equal(packing.place_per_sample(np.arange(N) + 1.0, rows),
                                  np.where(rows["sample_index"] >= 0, rows["sample_index"] + 1.0, 0))


def _layouts(lengths, seed):
    """The same samples unpacked (pad_rows) and packed, with per-sample advantages and old log-probs."""
    prompts, responses = _samples(lengths, seed)
    rng = np.random.default_rng(seed + 1)
    r_len = np.array([r for _, r in lengths])
    old = np.where(np.arange(R)[None] < r_len[:, None], rng.normal(-2.0, 1.0, (N, R)), 0.0)
    old = old.astype(np.float32)
    adv = rng.normal(size=N).astype(np.float32)
    unpacked = batching.pad_rows(prompts, responses, [o[:r] for o, r in zip(old, r_len)],
                                 prompt_length=P, response_length=R, pad_id=0)
    plan = packing.pack([p + r for p, r in lengths], L)
    rows = packing.packed_rows(prompts, responses, plan, num_rows=N)
    rows["old_logprobs"] = packing.place_per_token(old, rows)
    rows["advantages"] = packing.place_per_sample(adv, rows)
    flat, valid = packing.unpack_indices(plan, r_len, R)
    return unpacked, rows, adv, (flat, valid)


def _mode_kwargs(mode, token_count, seq_count):
    if mode == "verl-legacy-token-mean":
        return dict(micro_batch_weight=0.5, num_dp_ranks=2)
    kw = dict(global_token_count=token_count, global_seq_count=seq_count)
    if mode == "seq-mean-token-sum-norm":
        kw["loss_scale_length"] = float(R)  # the unpacked default (T = R), explicit when packed
    return kw


@SMALL
@given(LENGTHS, st.integers(0, 2**16), st.booleans())
def test_packed_loss_metrics_and_logprob_gradient_equal_unpacked_in_every_mode(lengths, seed,
                                                                                 global_counts):
    unpacked, rows, adv, (flat, valid) = _layouts(lengths, seed)
    # A current policy near the old one, so some ratios clip and some do not.
    rng = np.random.default_rng(seed + 2)
    lp = unpacked["rollout_logprobs"] + rng.normal(0.0, 0.3, (N, R)).astype(np.float32)
    lp_packed = packing.place_per_token(lp, rows)
    mask = unpacked["response_mask"]
    counts = (float(mask.sum()) + 5.0, float(mask.any(1).sum()) + 2.0) if global_counts else (None,) * 2
    for mode in LOSS_AGG_MODES:
        kw = _mode_kwargs(mode, *counts)

        def ref(x):
            return compute_policy_loss(unpacked["rollout_logprobs"], x, adv, mask, loss_agg_mode=mode,
                                       **kw)

        def got(x):
            return packing.packed_policy_loss(rows["old_logprobs"], x, rows["advantages"],
                                              rows["response_mask"], rows["sample_index"],
                                              num_samples=N, loss_agg_mode=mode, **kw)

        (ref_loss, ref_metrics), ref_grad = jax.value_and_grad(ref, has_aux=True)(lp)
        (loss, metrics), grad = jax.value_and_grad(got, has_aux=True)(lp_packed)
        np.testing.assert_allclose(loss, ref_loss, **TOL, err_msg=mode)
        np.testing.assert_allclose(packing.unpack_tokens_jnp(grad, flat, valid), ref_grad, **TOL,
                                   err_msg=mode)
        assert set(metrics) == set(ref_metrics)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], **TOL, err_msg=f"{mode} {k}")
    # Per-sample advantages give the same loss as the placed per-token ones.
    same = packing.packed_policy_loss(rows["old_logprobs"], lp_packed, adv, rows["response_mask"],
                                      rows["sample_index"], num_samples=N)[0]
    np.testing.assert_allclose(same, compute_policy_loss(unpacked["rollout_logprobs"], lp, adv, mask)[0],
                               **TOL)


def test_packed_loss_arguments_are_validated():
    z = np.zeros((2, 4), np.float32)
    idx = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="loss_scale_length"):
        packing.packed_policy_loss(z, z, z, z, idx, num_samples=2, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="advantages must be"):
        packing.packed_policy_loss(z, z, np.zeros(3), z, idx, num_samples=2)
    with pytest.raises(ValueError, match="multiple of num_dp_ranks"):
        packing.packed_policy_loss(z, z, z, z, idx, num_samples=3, num_dp_ranks=2,
                                   loss_agg_mode="verl-legacy-token-mean")


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    params = models.Qwen2(cfg, rngs=nnx.Rngs(0)).params()

    def losses(params, lp_fn, batch, adv, token_count, seq_count, loss_fn):
        """Log-probs [N, R] and, per mode, (loss, parameter gradient)."""
        out = {}
        for mode in LOSS_AGG_MODES:
            kw = _mode_kwargs(mode, token_count, seq_count)
            out[mode] = jax.value_and_grad(lambda p: loss_fn(lp_fn(p, batch), batch, adv, mode, kw))(params)
        return lp_fn(params, batch), out

    def unpacked_lp(params, b):
        ids = jnp.concatenate([b["prompt_ids"], b["response_ids"]], axis=1)
        mask = jnp.concatenate([b["prompt_mask"], b["response_mask"]], axis=1)
        targets = jnp.concatenate([jnp.zeros_like(b["prompt_mask"]), b["response_mask"]], axis=1)
        return sequence_logprobs(params, cfg, ids, mask, targets)[0][:, P:]

    def unpacked_loss(lp, b, adv, mode, kw):
        return compute_policy_loss(b["rollout_logprobs"], lp, adv, b["response_mask"],
                                   loss_agg_mode=mode, **kw)[0]

    def packed_lp(params, b):
        return packing.packed_logprobs(params, cfg, b)[0]

    def packed_loss(lp, b, adv, mode, kw):
        return packing.packed_policy_loss(b["old_logprobs"], lp, adv, b["response_mask"],
                                          b["sample_index"], num_samples=N, loss_agg_mode=mode, **kw)[0]

    unpacked = jax.jit(lambda p, b, a, t, s: losses(p, unpacked_lp, b, a, t, s, unpacked_loss))
    packed = jax.jit(lambda p, b, a, t, s: losses(p, packed_lp, b, a, t, s, packed_loss))
    return params, unpacked, packed


@SMALL
@given(LENGTHS, st.integers(0, 2**16))
def test_tiny_model_logprobs_losses_and_gradients_from_packed_rows_equal_unpacked(tiny, lengths,
                                                                                  seed):
    params, unpacked_fn, packed_fn = tiny
    unpacked, rows, adv, (flat, valid) = _layouts(lengths, seed)
    # Pretend this is one micro-batch of a bigger mini-batch: global counts above its own.
    token_count = jnp.float32(unpacked["response_mask"].sum() + 5)
    seq_count = jnp.float32(unpacked["response_mask"].any(1).sum() + 2)
    ref_lp, ref = unpacked_fn(params, unpacked, adv, token_count, seq_count)
    lp, got = packed_fn(params, rows, adv, token_count, seq_count)
    np.testing.assert_allclose(packing.unpack_tokens_jnp(lp, flat, valid), ref_lp, **TOL)
    for mode in LOSS_AGG_MODES:
        np.testing.assert_allclose(got[mode][0], ref[mode][0], **TOL, err_msg=mode)
        for g, r in zip(jax.tree.leaves(got[mode][1]), jax.tree.leaves(ref[mode][1])):
            np.testing.assert_allclose(g, r, **TOL, err_msg=mode)
