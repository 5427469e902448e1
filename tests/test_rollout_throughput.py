"""benchmarks/rollout_throughput.py's paged-vs-dense sections run end to end at a toy size (`--quick`)
and print their three tables; both caches generate exactly the requested lengths. No timing
assertions: this machine is shared."""

from benchmarks import common, rollout_throughput
from dapo_jax import models
from dapo_jax.sampler.paged_cache import page_bytes


def test_quick_paged_sections_print_the_three_tables(capsys):
    result = rollout_throughput.main(["--quick"])
    text = capsys.readouterr().out
    assert common.table_headers(text) == [rollout_throughput.PAGED_STEP_COLUMNS,
                                          rollout_throughput.PREFILL_COLUMNS,
                                          rollout_throughput.PAGED_DAPO_COLUMNS,
                                          rollout_throughput.PAGED_MEMORY_COLUMNS]
    paged = result["paged"]
    assert [(r["kv_cache"], r["max_target_length"]) for r in paged["steps"]] == [
        ("paged", 32), ("paged", 256), ("dense", 32), ("dense", 256)]
    assert all(r["ms_per_step"] > 0 for r in paged["steps"])
    dense, pg = paged["dapo"]["dense"], paged["dapo"]["paged"]
    # Both generated the same lognormal lengths (dapo_rollout checks them against the requests).
    assert dense["samples"] == pg["samples"] == 2 * 4 and dense["tokens"] == pg["tokens"]
    assert paged["speedup"] == pg["tokens_per_s"] / dense["tokens_per_s"]
    # Memory: the dense cache holds every slot at full length; the paged peak is what was in use.
    cfg = models.preset("tiny")
    assert dense["kv_peak_bytes"] == dense["kv_allocated_bytes"]
    assert 0 < pg["kv_peak_bytes"] <= pg["kv_allocated_bytes"]
    assert pg["kv_peak_bytes"] % page_bytes(cfg, 16, "float32") == 0
    assert paged["memory"]["paged_samples"] >= paged["memory"]["dense_samples"]
    assert "Paged vs dense KV cache (tiny shape" in text and "lognormal" in text
    # Prefill: the same prompt tokens; one call per prompt computes their buckets, packed rows
    # (64 tokens here) compute fewer positions in fewer calls.
    one, packed = paged["prefill"]
    assert one["prompt_tokens"] == packed["prompt_tokens"] and one["calls"] == 6
    assert packed["calls"] < one["calls"] and packed["computed_tokens"] < one["computed_tokens"]
