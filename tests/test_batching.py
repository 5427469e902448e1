"""Token-budget micro-batches (`batching.pack_minibatch`): every trained sample packed exactly once,
shapes drawn from a few buckets, ranks balanced, and the mini-batch's exact counts."""

import numpy as np
import pytest

from dapo_jax.training import batching


def _samples(rng, n, max_prompt, max_response):
    prompts = [rng.integers(3, 100, size=rng.integers(1, max_prompt + 1)) for _ in range(n)]
    responses = [rng.integers(3, 100, size=rng.integers(0, max_response + 1)) for _ in range(n)]
    logprobs = np.zeros((n, max_response), np.float32)
    for i, r in enumerate(responses):
        logprobs[i, :len(r)] = -rng.random(len(r))
    return prompts, responses, logprobs


def test_layout_buckets_halve_and_keep_the_budget():
    layout = batching.packing_layout(2048 + 20480, 90112, num_ranks=8, num_buckets=3)
    assert layout.buckets == ((5632, 16), (11264, 8), (22528, 4))
    assert all(rows * length <= 90112 for length, rows in layout.buckets)
    assert layout.bucket_for(5000) == (5632, 16) and layout.bucket_for(5633) == (11264, 8)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=1000 cannot hold"):
        batching.packing_layout(2000, 1000, num_ranks=1)


@pytest.mark.parametrize("seed,trim_steps", [(s, 1 + 7 * (s % 2)) for s in range(6)])
def test_every_trained_sample_is_packed_once_and_ranks_are_balanced(seed, trim_steps):
    rng = np.random.default_rng(seed)
    n, max_prompt, max_response, ranks = 64, 12, 40, 4
    prompts, responses, logprobs = _samples(rng, n, max_prompt, max_response)
    advantages = rng.normal(size=n).astype(np.float32)
    in_loss = (rng.random(n) > 0.2).astype(np.int8)
    layout = batching.packing_layout(max_prompt + max_response, 2 * 64, ranks, num_buckets=3,
                                     trim_steps=trim_steps)
    pm = batching.pack_minibatch(prompts, responses, logprobs, advantages, in_loss, layout,
                                 pad_id=0)
    f = pm.fields
    assert all((rows, pm.row_length) in layout.shapes() for rows in pm.micro_rows)
    assert f["input_ids"].shape == (sum(pm.micro_rows), pm.row_length)
    assert all(r % ranks == 0 for r in pm.micro_rows)
    trained = [i for i in range(n) if in_loss[i] and len(responses[i])]
    # The exact counts of the mini-batch: response tokens in the loss and samples with any.
    assert pm.token_count == sum(len(responses[i]) for i in trained)
    assert pm.seq_count == len(trained)
    assert f["response_mask"].sum() == pm.token_count
    # Each trained sample appears once, contiguous, with restarting positions and its values.
    seen = {}
    ids, seg, pos = (x.reshape(-1, pm.row_length) for x in (f["input_ids"], f["segment_ids"],
                                                           f["positions"]))
    lp, adv = (x.reshape(-1, pm.row_length) for x in (f["rollout_logprobs"], f["advantages"]))
    for r in range(ids.shape[0]):
        for s in set(seg[r][seg[r] > 0].tolist()):
            cols = np.flatnonzero(seg[r] == s)
            assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
            assert np.array_equal(pos[r, cols], np.arange(len(cols)))
            seen[tuple(ids[r, cols].tolist())] = (lp[r, cols], adv[r, cols])
    assert len(seen) == len(trained)
    for i in trained:
        key = tuple(np.concatenate([prompts[i], responses[i]]).tolist())
        lp_i, adv_i = seen[key]
        assert np.allclose(lp_i[len(prompts[i]):], logprobs[i, :len(responses[i])])
        assert np.allclose(adv_i, advantages[i])
    # Longest-first spreading: no rank holds much more than the mean.
    assert pm.rank_tokens.sum() == sum(len(prompts[i]) + len(responses[i]) for i in trained)
    assert pm.rank_tokens.max() / pm.rank_tokens.mean() < 1.5
    assert 0 < pm.fill <= 1


def test_shapes_come_from_the_buckets_whatever_the_lengths():
    rng = np.random.default_rng(0)
    layout = batching.packing_layout(64, 256, num_ranks=2, num_buckets=3)
    shapes = set()
    for trial in range(20):
        cap = int(rng.integers(2, 49))
        prompts, responses, logprobs = _samples(rng, 16, 16, cap)
        pm = batching.pack_minibatch(prompts, responses, logprobs, np.ones(16), np.ones(16),
                                     layout, pad_id=0)
        shapes.update((pm.micro(m)["input_ids"].shape for m in range(pm.num_micro)))
    assert shapes <= layout.shapes()
    assert len({length for _, length in shapes}) > 1  # short and long mini-batches: other buckets


def test_row_counts_are_powers_of_two_up_to_the_budget():
    layout = batching.packing_layout(2048 + 20480, 90112, num_ranks=8, num_buckets=3)
    assert layout.row_counts(22528) == (1, 2, 4)
    assert layout.row_counts(5632) == (1, 2, 4, 8, 16)
    odd = batching.packing_layout(100, 600, num_ranks=1, num_buckets=1)
    assert odd.buckets == ((112, 5),) and odd.row_counts(112) == (1, 2, 4, 5)
    assert len(layout.shapes()) == 3 + 4 + 5


def test_rows_are_cut_when_that_computes_fewer_token_slots():
    # Max 88 tokens (rows of 96), samples of 40-63 tokens: one per row, as in the toy's updates.
    rng = np.random.default_rng(1)
    n = 32
    prompts = [rng.integers(3, 100, size=int(rng.integers(30, 46))) for _ in range(n)]
    responses = [rng.integers(3, 100, size=int(rng.integers(10, 18))) for _ in range(n)]
    logprobs = -rng.random((n, 40)).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    whole = batching.packing_layout(88, 64 * 96, num_ranks=2, trim_steps=1)
    cut = batching.packing_layout(88, 64 * 96, num_ranks=2, trim_steps=8)
    a = batching.pack_minibatch(prompts, responses, logprobs, adv, np.ones(n), whole, pad_id=0)
    b = batching.pack_minibatch(prompts, responses, logprobs, adv, np.ones(n), cut, pad_id=0)
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    assert a.row_length == 96 and longest <= 63
    assert cut.trim_quantum(96) == 16 and b.row_length == -(-longest // 16) * 16
    assert all((rows, b.row_length) in cut.shapes() for rows in b.micro_rows)

    def slots(pm):
        return pm.fields["input_ids"].size

    # Fewer token slots for the same samples: every one packed once, same counts.
    assert slots(b) < slots(a) and b.fill > a.fill
    assert (b.token_count, b.seq_count) == (a.token_count, a.seq_count)
    assert sorted(b.fields["input_ids"][b.fields["segment_ids"] > 0].tolist()) == sorted(
        a.fields["input_ids"][a.fields["segment_ids"] > 0].tolist())
    assert b.fields["response_mask"].sum() == a.fields["response_mask"].sum()
    # Bounded programs: at most trim_steps lengths per bucket, each a multiple of 16.
    for length, _ in cut.buckets:
        lengths = cut.trimmed_lengths(length)
        assert len(lengths) <= 8 and lengths[-1] == length
        assert all(x % 16 == 0 for x in lengths)
    with pytest.raises(ValueError, match="packing_trim_steps"):
        batching.packing_layout(88, 64 * 96, num_ranks=2, trim_steps=0)


def test_a_short_mini_batch_computes_its_rows_not_the_whole_budget():
    rng = np.random.default_rng(0)
    layout = batching.packing_layout(64, 64 * 16, num_ranks=2)  # 16 full rows per rank
    prompts, responses, logprobs = _samples(rng, 6, 8, 40)
    pm = batching.pack_minibatch(prompts, responses, logprobs, np.ones(6), np.ones(6), layout,
                                 pad_id=0)
    # Six samples of <= 48 tokens need at most 6 rows: one micro-batch of a few rows per rank.
    assert pm.num_micro == 1 and pm.micro_rows[0] <= 2 * 4
    big = batching.pack_minibatch(*_samples(rng, 200, 8, 40), np.ones(200), np.ones(200), layout,
                                  pad_id=0)
    # Many samples: full micro-batches of the budget's 16 rows per rank, then one of the fewest
    # rows (a power of two) that hold the rest.
    assert big.num_micro > 1 and all(r == 2 * 16 for r in big.micro_rows[:-1])
    assert big.micro_rows[-1] in (2, 4, 8, 16, 32)
    assert big.fill > 0.5


def test_nothing_to_train_gives_one_empty_micro_batch():
    layout = batching.packing_layout(32, 64, num_ranks=2)
    pm = batching.pack_minibatch([np.array([5, 6])], [np.array([7, 8, 9])],
                                 np.zeros((1, 3), np.float32), np.ones(1), np.zeros(1), layout,
                                 pad_id=0)
    assert pm.num_micro == 1 and pm.token_count == 0 and pm.seq_count == 0
    assert not pm.fields["response_mask"].any()


def test_cutting_rows_never_computes_more_than_the_bucket():
    rng = np.random.default_rng(2)
    for trial in range(30):
        n = int(rng.integers(1, 80))
        prompts, responses, logprobs = _samples(rng, n, 30, int(rng.integers(1, 60)))
        keep = np.ones(n)
        args = (prompts, responses, logprobs, np.ones(n), keep)
        whole = batching.pack_minibatch(*args, batching.packing_layout(90, 8 * 96, 2),
                                        pad_id=0)
        cut = batching.pack_minibatch(*args, batching.packing_layout(90, 8 * 96, 2, trim_steps=6),
                                      pad_id=0)
        assert cut.fields["input_ids"].size <= whole.fields["input_ids"].size
        assert cut.token_count == whole.token_count


@pytest.mark.parametrize("num_rows,ranks,most,expected", [
    (40, 8, 4, (4, 1)),  # 5 rows per rank: a full micro-batch, then 1 row each, not 4 + 4
    (140, 8, 4, (4, 4, 4, 4, 2)),  # 18 per rank
    (128, 8, 4, (4, 4, 4, 4)),
    (3, 8, 4, (1,)),  # fewer rows than ranks: one row each
    (70, 2, 16, (16, 16, 4)),  # 35 per rank: 3 left, the fewest allowed rows that hold them
])
def test_micro_batches_are_full_and_the_last_holds_what_is_left(num_rows, ranks, most, expected):
    layout = batching.packing_layout(64, 64 * most, num_ranks=ranks, num_buckets=1)
    assert layout.buckets == ((64, most),)
    rows = batching.micro_batch_rows(num_rows, layout, 64)
    assert rows == expected
    assert sum(rows) * ranks >= num_rows and all(r in layout.row_counts(64) for r in rows)


def test_a_short_last_micro_batch_keeps_every_sample_and_balances_ranks():
    # 5 rows per rank over 2 ranks with 4 per micro-batch: micro-batches of 4 and 1 rows per rank.
    rng = np.random.default_rng(3)
    n = 10
    prompts = [rng.integers(3, 100, size=40) for _ in range(n)]
    responses = [rng.integers(3, 100, size=20) for _ in range(n)]
    logprobs = -rng.random((n, 20)).astype(np.float32)
    layout = batching.packing_layout(64, 64 * 4, num_ranks=2, num_buckets=1)
    pm = batching.pack_minibatch(prompts, responses, logprobs, np.arange(n, dtype=np.float32),
                                 np.ones(n), layout, pad_id=0)
    assert pm.micro_rows == (8, 2) and pm.fill == 1.0 - 4 / 64
    seen = []
    for m in range(pm.num_micro):
        micro = pm.micro(m)
        assert micro["input_ids"].shape == (pm.micro_rows[m], 64)
        # Each rank's share of a micro-batch (its equal slice of the rows) holds real samples.
        for part in np.split(micro["segment_ids"], 2):
            assert (part > 0).any(axis=1).all()
        seen += sorted(set(micro["advantages"][micro["segment_ids"] > 0].tolist()))
    assert sorted(seen) == list(range(n))
    assert pm.rank_tokens.tolist() == [300.0, 300.0]
