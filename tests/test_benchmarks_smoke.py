"""The benchmarks run end to end on the tiny preset and print the promised tables; their FLOP, byte and
device-peak bookkeeping matches independent counts. No timing assertions: this machine is shared."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, model_step, rollout_throughput
from dapo_jax import models
from dapo_jax.runtime import devices


def _number(cell: str) -> float:
    return float(cell.rstrip("x%"))


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


def test_model_step_smoke_prints_step_and_peak_tables(capsys, tmp_path):
    out_json = tmp_path / "model_step.json"
    model_step.main(["--smoke", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert common.table_headers(text) == [
        ["preset", "params", "batch", "seq_len", "samples/row", "attention", "dtype", "remat",
         "compile s", "step s (median)", "tokens/s", "achieved TFLOP/s"],
        ["reference", "peak TFLOP/s", "MFU (achieved / peak)"],
    ]
    assert "3 x forward" in text and "only for the scored (response) tokens" in text
    result = json.loads(out_json.read_text())
    assert result["config"]["preset"] == "tiny"
    # The documented FLOP convention: fwd+bwd = 3 x forward; 2 rows of 32 tokens, the last 24 of
    # each scored (the first quarter is prompt), the lm head counted for those alone.
    cfg = models.preset("tiny")
    head = 2 * cfg.vocab_size * cfg.hidden_size
    assert result["scored_tokens"] == 2 * 24
    expected = 3 * (2 * 32 * (cfg.flops_per_token(32) - head) + 2 * 24 * head)
    assert result["flops_per_step"] == pytest.approx(expected)
    assert result["tokens_per_s"] == pytest.approx(2 * 32 / result["step_s"]["median"])
    refs = [p["reference"] for p in result["peaks"]]
    assert refs[0].startswith("measured bfloat16") and refs[1].startswith("measured float32")
    # MFU is the achieved rate over each measured peak (recomputed here from the logged step time).
    achieved = expected / result["step_s"]["median"]
    assert result["achieved_flops"] == pytest.approx(achieved)
    for p in result["peaks"][:2]:
        assert p["ratio"] == pytest.approx(achieved / p["peak_flops"]), p
    # On CPU there is no published peak to compare with.
    assert result["peaks"][2]["ratio"] is None and "n/a" in _rows(text)[-1]


def test_rollout_smoke_prints_one_table_with_both_engines(capsys):
    result = rollout_throughput.main(["--smoke"])
    text = capsys.readouterr().out
    assert common.table_headers(text) == [rollout_throughput.COLUMNS]
    (row,) = _rows(text)
    cells = dict(zip(rollout_throughput.COLUMNS, row))
    assert cells["preset"] == "tiny" and cells["batch"] == "4"
    hf, ours = _number(cells["HF tok/s"]), _number(cells["ours tok/s"])
    assert hf > 0 and ours > 0
    assert _number(cells["ours / HF"]) == pytest.approx(ours / hf, rel=0.02)
    # Both engines produced exactly 8 tokens for each of the 4 sequences.
    (r,) = result["rows"]
    assert r["hf"]["tokens"] == r["ours"]["tokens"] == 4 * 8
    # The roofline's weight bytes are the engine's own float32 copy of the tiny model.
    assert r["ours"]["param_bytes"] == models.preset("tiny").num_params * 4
    assert cells["HBM roofline tok/s"] == "n/a" and cells["ours / roofline"] == "n/a"
    assert cells["samples / prompt"] == "1" and "Every sequence has its own prompt" in text


def test_rollout_smoke_with_shared_prompts_generates_the_whole_batch(capsys):
    result = rollout_throughput.main(["--smoke", "--samples_per_prompt", "2"])
    text = capsys.readouterr().out
    (r,) = result["rows"]
    assert r["samples_per_prompt"] == 2 and "Prompts are shared by 2 sequences each" in text
    # 2 prompts x 2 samples x 8 tokens on both sides; ours prefilled each prompt once.
    assert r["hf"]["tokens"] == r["ours"]["tokens"] == 4 * 8
    with pytest.raises(SystemExit):
        rollout_throughput.parse_args(["--batches", "6", "--samples_per_prompt", "4"])


def test_decode_roofline_of_qwen05b_on_h100_matches_hand_count():
    cfg = models.preset("qwen2.5-0.5b")
    params_bytes = 494_032_768 * 2  # Qwen2.5-0.5B's published parameter count, bf16
    # K and V x layers x batch x length x kv heads x head_dim x bf16 bytes
    kv_bytes = 2 * 24 * 64 * 192 * 2 * 64 * 2
    got = rollout_throughput.decode_bytes_per_step(cfg, 64, 192, params_bytes, "bfloat16")
    assert got == params_bytes + kv_bytes
    h100 = devices.device_spec("NVIDIA H100 80GB HBM3")
    assert rollout_throughput.roofline_tokens_per_s(got, 64, h100.hbm_bytes_per_s) == pytest.approx(
        3.35e12 / (params_bytes + kv_bytes) * 64)


@pytest.mark.parametrize("kind,name,peak,bandwidth", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989e12, 3.35e12),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H200", "NVIDIA H200", 989e12, 4.8e12),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-80GB", 312e12, 2.0e12),
    ("TPU v5 lite", "TPU v5e", 197e12, 8.1e11),
    ("TPU v5", "TPU v5p", 459e12, 2.76e12),
    ("TPU v6 lite", "TPU v6e", 918e12, 1.64e12),
])
def test_device_kind_strings_map_to_published_peaks(kind, name, peak, bandwidth):
    spec = devices.device_spec(kind)
    assert (spec.name, spec.peak_bf16_flops, spec.hbm_bytes_per_s) == (name, peak, bandwidth)


def test_unknown_device_kind_has_no_published_peak():
    assert devices.device_spec("cpu") is None


def test_shape_flop_count_equals_xla_cost_analysis_of_tied_forward():
    # XLA's own count of the compiled forward pass is the independent reference. Layers unrolled
    # (XLA counts a loop body once); full (masked) attention over all t keys, as the code computes.
    cfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                             scan_layers=False)
    params = jax.eval_shape(lambda: models.init_model(cfg).params())
    b, t = 2, 16
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def forward(p, x):
        hidden, _ = models.decoder_apply(p, cfg, x)
        return models.lm_logits(p, cfg, hidden)

    cost = jax.jit(forward).lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    expected = common.forward_flops_per_token(cfg, attended_keys=t) * b * t
    # Elementwise work (norms, rope, softmax, silu) is the small remainder XLA also counts.
    assert expected <= cost["flops"] <= 1.03 * expected


def test_train_throughput_smoke_compares_padded_and_packed(capsys, tmp_path):
    from benchmarks import train_throughput
    out_json = tmp_path / "train_throughput.json"
    train_throughput.main(["--smoke", "--micro_rows", "2", "--repeats", "2", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert common.table_headers(text) == [
        ["layout", "row tokens", "micro-batches", "computed tokens", "compile s", "old log-prob s",
         "update s", "useful tokens/s", "peak GiB", "MFU (useful)", "MFU (published peak)"],
        ["row tokens", "blockwise GiB", "dense GiB"],
    ]
    r = json.loads(out_json.read_text())
    padded, packed = r["results"]["padded"], r["results"]["packed"]
    # Padding computes every sample at the maximum; packing computes fewer tokens for the same ones.
    assert padded["computed_tokens"] == r["config"]["samples"] * r["config"]["max_len"]
    # Micro-batches of two full rows' budget: 8 padded rows in 4; packed rows fill 2 per micro-batch.
    assert padded["micro_batches"] == 4 and packed["micro_batches"] == -(-packed["computed_tokens"]
                                                                       // packed["row_length"] // 2)
    for x in (padded, packed):
        # The fastest of the two timed runs is reported; the first is kept beside it.
        assert x["repeats"] == 2 and x["first_run_s"] >= x["old_logprob_s"] + x["update_s"]
        assert x["mfu_published"] is None  # no published peak for a CPU
    assert "the fastest of 2 runs" in text
    assert r["useful_tokens"] <= packed["computed_tokens"] < padded["computed_tokens"]
    assert packed["fill"] == pytest.approx(r["useful_tokens"] / packed["computed_tokens"])
    for x in (padded, packed):
        assert x["useful_tokens_per_s"] == pytest.approx(
            r["useful_tokens"] / (x["old_logprob_s"] + x["update_s"]))
    assert r["ratio"] == pytest.approx(packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"])
    # Both layouts optimise the same loss on the same samples (same weights, same old log-probs).
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4, abs=1e-6)
    assert {m["row_length"] for m in r["memory_scaling"]} == {64, 128}


def test_dapo_lengths_follow_the_requested_shape():
    from benchmarks import train_throughput
    rng = np.random.default_rng(0)
    lengths = train_throughput.dapo_lengths(4000, 1920, 0.25, 0.05, rng)
    assert lengths.min() >= 1 and lengths.max() == 1920
    assert np.mean(lengths == 1920) == pytest.approx(0.05, abs=0.005)
    assert 0.18 * 1920 < lengths.mean() < 0.32 * 1920


def test_model_step_packed_rows_restart_positions_and_count_attention_per_sample():
    cfg = models.preset("tiny")
    batch, lengths = model_step.make_batch(cfg, 2, 64, seed=3, samples_per_row=4)
    seg, pos = np.asarray(batch["segment_ids"]), np.asarray(batch["positions"])
    assert lengths.sum() == 2 * 64 and len(lengths) == 8 and lengths.min() >= 4
    row_lengths = [np.bincount(seg[b])[1:] for b in range(2)]
    np.testing.assert_array_equal(np.concatenate(row_lengths), lengths)
    for b in range(2):
        for s, n in enumerate(row_lengths[b]):
            np.testing.assert_array_equal(pos[b][seg[b] == s + 1], np.arange(n))
    # No sample's first token is scored: it would be predicted from the previous sample.
    assert not np.asarray(batch["response_mask"])[pos == 0].any()
    scored = int(np.asarray(batch["response_mask"]).sum())
    head = 2 * cfg.vocab_size * cfg.hidden_size
    expected = 3 * (sum(n * (cfg.flops_per_token(int(n)) - head) for n in lengths) + scored * head)
    assert model_step.step_flops(cfg, lengths, scored) == pytest.approx(expected)
    # Attention within samples costs less than over the whole row.
    assert model_step.step_flops(cfg, lengths, scored) < model_step.step_flops(cfg, [64, 64], scored)
    with pytest.raises(SystemExit):
        model_step.parse_args(["--seq_len", "16", "--samples_per_row", "5"])


def test_decode_roofline_reads_the_pages_in_use_for_paged_and_the_whole_cache_for_dense():
    # Steps of a 15-token prompt: the sample holds 16, 17, 18 tokens -> one, two, two pages of 16.
    assert rollout_throughput.kv_tokens_read("paged", 15, 3, 16) == pytest.approx((16 + 32 + 32) / 3)
    assert rollout_throughput.kv_tokens_read("dense", 15, 3, 16) == 18
