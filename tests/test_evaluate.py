"""`python -m dapo_jax.evaluate`: a full AIME 2024 evaluation of a tiny scripted model on CPU, and
scoring a responses file; both against accuracies known from the data."""

import json

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

import data_pipeline
from configs import eval_aime
from data_pipeline import datasets as ds_lib
from dapo_jax import evaluate, models


# Every sample of the scripted model below is this response: AIME 2024 has two problems whose
# answer is 104 (2024-I-05 and 2024-I-14), so the evaluation has a known, non-zero accuracy.
SCRIPTED_RESPONSE = "Answer: 104"


@pytest.fixture(scope="module")
def scripted_qwen_checkpoint(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny Qwen2 (real Qwen2.5 vocabulary) that writes SCRIPTED_RESPONSE then EOS to any prompt.

    Attention and MLP outputs are zeroed, so the hidden state at each position is the current
    token's embedding and the model is a lookup table current token -> next token: each token of
    the response gets its own embedding direction, whose lm_head column scores the next one
    (logit 80 over 0 for all others: deterministic even at temperature 1); every other token,
    such as the prompt's last, starts the response.
    """
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    chain = tok(SCRIPTED_RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(set(chain)) == len(chain)  # one successor per token
    cfg = models.preset("tiny", vocab_size=151936, tie_word_embeddings=False)
    assert len(chain) <= cfg.hidden_size
    model = models.init_model(cfg, seed=3, mesh=models.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    params = jax.tree.map(np.array, model.params())
    params["layers"]["o_kernel"][:] = 0.0
    params["layers"]["down_kernel"][:] = 0.0
    params["final_norm"][:] = 1.0
    embed = np.zeros_like(params["embed"])
    embed[:, 0] = 1.0  # direction 0: "no response token yet"
    lm_head = np.zeros_like(params["lm_head"])
    lm_head[0, chain[0]] = 10.0
    for i, token in enumerate(chain[:-1]):
        embed[token] = 0.0
        embed[token, i + 1] = 1.0
        lm_head[i + 1, chain[i + 1]] = 10.0  # RMSNorm scales a unit vector by sqrt(64) = 8
    params["embed"], params["lm_head"] = embed, lm_head
    path = tmp_path_factory.mktemp("scripted_qwen")
    models.save_pretrained(params, cfg, path, tokenizer_dir=qwen_tokenizer_dir)
    return path, chain


def _config(datasets="aime2024"):
    c = eval_aime.get_config(datasets)
    c.mesh.num_devices = 1
    c.model.dtype = "float32"
    c.rollout.cache_dtype = "float32"
    c.rollout.max_concurrent_decodes = 32
    c.data.max_prompt_length = 512
    c.data.max_response_length = 8  # a small token budget: the scripted response needs 7
    c.algo.overlong_buffer.enable = False  # a training reward term; its buffer would exceed 8
    c.eval.n = 2
    return c


def test_full_aime_evaluation_of_a_scripted_model_gives_the_known_accuracy(
        scripted_qwen_checkpoint, tmp_path, shared_data):
    path, chain = scripted_qwen_checkpoint
    problems = [json.loads(line) for line in (shared_data / "aime2024.jsonl").read_text().splitlines()]
    solved = {str(p["id"]) for p in problems if str(p["answer"]) == "104"}
    assert solved == {"2024-I-05", "2024-I-14"}  # the data this test's expectations rest on
    c = _config()
    records = ds_lib.load_records("aime2024", c, split="val", cache_dir=tmp_path / "tfds")
    rendered = data_pipeline.render_prompts(
        AutoTokenizer.from_pretrained(str(path)), records,
        max_prompt_length=c.data.max_prompt_length, system_prompt=c.data.system_prompt,
        apply_chat_template=c.data.apply_chat_template)
    assert not {ids[-1] for ids in rendered.token_ids} & set(chain)  # every prompt starts it

    results = evaluate.run(c, checkpoint=str(path), step=None,
                           responses=None, out=str(tmp_path), progress=False)
    metrics = results["aime2024"]
    assert metrics["val-core/aime2024/acc/mean@2"] == pytest.approx(2 / 30)
    assert metrics["val-aux/aime2024/acc/pass@2"] == pytest.approx(2 / 30)
    assert metrics["val-aux/aime2024/response_length/max"] == len(chain)  # EOS counted
    out = tmp_path / "aime2024"
    report = json.loads((out / "report.json").read_text())
    assert report["num_problems"] == 30 and report["num_samples"] == 60
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["problem_id"] for s in samples] == [str(p["id"]) for p in problems for _ in range(2)]
    assert {(s["response"], s["finish_reason"], s["length"]) for s in samples} == {
        (SCRIPTED_RESPONSE, "eos", len(chain))}
    assert sorted(s["problem_id"] for s in samples if s["acc"]) == sorted([*solved, *solved])
    table = (out / "report.md").read_text()
    for p in problems:
        won = str(p["id"]) in solved
        row = (f"| `{p['id']}` | `{p['answer']}` | {1.0 if won else 0.0:.4f} | {2 if won else 0} / 2 "
               f"| `104` | {'yes' if won else 'no'} |")
        assert row in table, row


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


def test_reward_boxed_fallback_reaches_responses_scoring(tmp_path, shared_data):
    # Bare boxes (no Answer line): wrong under the DAPO release's rule, right under verl's fallback.
    lines = (shared_data / "aime2024.jsonl").read_text().splitlines()
    rows = [{"id": str(p["id"]), "response": f"so \\boxed{{{p['answer']}}}"}
            for p in map(json.loads, lines)]
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    for flag, accuracy in ((False, 0.0), (True, 1.0)):
        c = _config()
        c.reward.boxed_fallback = flag
        results = evaluate.run(c, checkpoint=None, step=None, responses=str(path),
                               out=str(tmp_path / f"scored_{flag}"))
        assert results["aime2024"]["val-core/aime2024/acc/mean@1"] == pytest.approx(accuracy)


def _responses(shared_data, names, correct_of=lambda i: i < 10, skip=0):
    rows = []
    for name in names:
        problems = [json.loads(line) for line in (shared_data / f"{name}.jsonl").read_text()
                    .splitlines()]
        for i, p in enumerate(problems[skip:]):
            answer = p["answer"] if correct_of(i) else p["answer"] + 1
            rows.append({"id": str(p["id"]), "response": f"Answer: {answer}"})
    return rows


def _write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_one_responses_file_is_scored_against_several_datasets(tmp_path, shared_data):
    path = _write_rows(tmp_path / "r.jsonl",
                       _responses(shared_data, ["aime2024", "aime2025"], lambda i: i < 6))
    c = _config("aime2024")
    c.data.val = ("aime2024,aime2025",)  # what --config.data.val=aime2024,aime2025 gives
    results = evaluate.run(c, checkpoint=None, step=None, responses=path, out=str(tmp_path / "o"))
    assert sorted(results) == ["aime2024", "aime2025"]
    for name in results:
        assert results[name][f"val-core/{name}/acc/mean@1"] == pytest.approx(6 / 30)


def test_problems_without_responses_are_an_error_unless_allow_partial(tmp_path, shared_data):
    # aime2025 complete, aime2024 without its first 4 problems.
    rows = (_responses(shared_data, ["aime2024"], skip=4)
            + _responses(shared_data, ["aime2025"]))
    path = _write_rows(tmp_path / "r.jsonl", rows)
    c = _config("aime2024,aime2025")
    with pytest.raises(ValueError, match=r"4 problems have no response \(aime2024: 4 of 30"
                                         r".*--allow_partial"):
        evaluate.run(c, checkpoint=None, step=None, responses=path, out=str(tmp_path / "o"))
    results = evaluate.run(c, checkpoint=None, step=None, responses=path,
                           out=str(tmp_path / "o"), allow_partial=True)
    assert results["aime2024"]["val-core/aime2024/acc/mean@1"] == pytest.approx(10 / 26)
    assert results["aime2025"]["val-core/aime2025/acc/mean@1"] == pytest.approx(10 / 30)


def test_evaluate_help_prints_the_flags_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--responses" in out and "--allow_partial" in out


def test_a_relative_checkpoint_path_and_the_recorded_tokenizer_are_used(
        tmp_path, monkeypatch, qwen_tokenizer_dir):
    """A training workdir given as a relative path loads, with the tokenizer its run recorded in
    run/tokenizer/ (no --config.tokenizer.path)."""
    import shutil

    from dapo_jax.training import run_record
    from dapo_jax.training.checkpointing import CheckpointStore

    cfg = models.preset("tiny", vocab_size=151936)
    mesh = models.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params = models.init_model(cfg, seed=0, mesh=mesh).params()
    workdir = tmp_path / "wd"
    store = CheckpointStore(workdir, keep=1, async_save=False)
    import optax
    store.save(1, params=params, opt_state=optax.sgd(0.1).init(params), arrays={},
               meta={"step": 1, "model_config": cfg.__dict__})
    store.close()
    run_record.copy_tokenizer(qwen_tokenizer_dir, workdir / "run" / "tokenizer")
    monkeypatch.chdir(tmp_path)
    c = _config()
    c.model.path = ""
    c.tokenizer.path = ""
    loaded, loaded_cfg, tok = evaluate._load_checkpoint("wd", None, c, mesh)
    assert tok == str(workdir / "run" / "tokenizer")
    assert loaded_cfg.num_layers == cfg.num_layers
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]))
    shutil.rmtree(workdir / "run")
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        evaluate._load_checkpoint("wd", None, c, mesh)
