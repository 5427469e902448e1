"""`python -m dapo_jax.evaluate`: a full AIME 2024 evaluation of a tiny random model on CPU."""

import json

import jax
import pytest

from configs import eval_aime
from dapo_jax import evaluate, models


@pytest.fixture(scope="module")
def tiny_qwen_checkpoint(tmp_path_factory, qwen_tokenizer_dir):
    """A random-weight tiny Qwen2 with the real Qwen2.5 vocabulary, saved as a HF directory."""
    cfg = models.preset("tiny", vocab_size=151936)
    model = models.init_model(cfg, seed=3, mesh=models.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    path = tmp_path_factory.mktemp("tiny_qwen")
    models.save_pretrained(model, cfg, path, tokenizer_dir=qwen_tokenizer_dir)
    return path


def _config(datasets="aime2024"):
    c = eval_aime.get_config(datasets)
    c.mesh.num_devices = 1
    c.model.dtype = "float32"
    c.rollout.cache_dtype = "float32"
    c.rollout.max_concurrent_decodes = 32
    c.data.max_prompt_length = 512
    c.data.max_response_length = 8  # a small token budget: the model is random
    c.eval.n = 2
    return c


def test_full_aime_evaluation_of_a_tiny_model_writes_all_outputs(tiny_qwen_checkpoint, tmp_path,
                                                                 shared_data):
    results = evaluate.run(_config(), checkpoint=str(tiny_qwen_checkpoint), step=None,
                           responses=None, out=str(tmp_path), progress=False)
    metrics = results["aime2024"]
    assert 0.0 <= metrics["val-core/aime2024/acc/mean@2"] <= 1.0
    assert metrics["val-aux/aime2024/response_length/max"] <= 8
    out = tmp_path / "aime2024"
    report = json.loads((out / "report.json").read_text())
    assert report["num_problems"] == 30 and report["num_samples"] == 60
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 60 and {s["finish_reason"] for s in samples} <= {"eos", "length"}
    table = (out / "report.md").read_text()
    assert table.count("| `aime2024-") >= 30 or table.count("\n| ") >= 30


def test_responses_file_is_scored_with_the_same_metrics(tmp_path, shared_data):
    problems = [json.loads(line) for line in (shared_data / "aime2024.jsonl").read_text().splitlines()]
    rows = []
    for i, p in enumerate(problems):
        for k in range(4):
            answer = p["answer"] if (i < 10 and k < 2) else p["answer"] + 1
            rows.append({"id": str(p["id"]), "response": f"Some work.\nAnswer: {answer}"})
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    results = evaluate.run(_config(), checkpoint=None, step=None, responses=str(path),
                           out=str(tmp_path / "scored"))
    m = results["aime2024"]
    assert m["val-core/aime2024/acc/mean@4"] == pytest.approx(20 / 120)
    assert m["val-aux/aime2024/acc/pass@4"] == pytest.approx(10 / 30)
