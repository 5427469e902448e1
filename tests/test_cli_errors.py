"""Bad input at the command line: every entry point answers a user error with one `error:` paragraph
that names the field or file and the fix, exit status 2 and no traceback (`--verbose` adds it).

Each case runs the real entry point (`python -m dapo_jax.train` / `evaluate` / `plan` / `demo`) as a
subprocess on a tiny config, with the bad input in tmp_path. Most fail at validation, before any
model or data work, so the whole file takes about a minute.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_jax.runtime import cli_errors

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = ["--config", "configs/toy.py"]
# Small toy data and no warm start: the cases that get as far as data or model loading stay quick.
SMALL = ["--config.warm_start.steps=0", "--config.data.toy.num_train=64",
         "--config.data.toy.num_heldout=8", "--config.trainer.val_before_train=False"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", f"dapo_jax.{module}", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Asserts status 2, no traceback and one `error:` line holding every word; returns the line."""
    tail = proc.stderr[-4000:]
    assert proc.returncode == 2, f"exit status {proc.returncode}\n{tail}"
    assert "Traceback" not in proc.stderr, tail
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, tail
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def train(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return cli("train", *TOY, "--workdir", tmp_path / "run", *args)


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def problems(tmp_path: pathlib.Path) -> pathlib.Path:
    """A two-problem val set (JSONL {id, problem, answer})."""
    return write_jsonl(tmp_path / "probs.jsonl", [{"id": "p1", "problem": "1 + 1", "answer": "2"},
                                                  {"id": "p2", "problem": "2 + 2", "answer": "4"}])


def score(tmp_path: pathlib.Path, problems: pathlib.Path, responses: pathlib.Path, *args: str
          ) -> subprocess.CompletedProcess:
    return cli("evaluate", *TOY, f"--config.data.val={problems}", "--responses", responses,
               "--out", tmp_path / "out", *args)


def hf_dir(tmp_path: pathlib.Path, config: dict | str | None) -> pathlib.Path:
    """A folder with the given config.json (dict, raw text, or none) and no weights yet."""
    d = tmp_path / "ckpt"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def toy_hf_config() -> dict:
    from dapo_jax.models.config import preset, to_hf_config
    return to_hf_config(preset("toy"))


# ------------------------------------------------------------------------------ config and flags
def test_invalid_config_value_names_the_field_and_the_bound(tmp_path):
    user_error(train(tmp_path, "--config.trainer.total_steps=0"),
               "config.trainer.total_steps", "must be >= 1")
    assert not (tmp_path / "run").exists()  # validated before anything is written


def test_every_invalid_field_is_listed_in_one_paragraph(tmp_path):
    line = user_error(train(tmp_path, "--config.trainer.total_steps=0", "--config.optim.lr=-1"),
                      "config.trainer.total_steps", "config.optim.lr", "must be > 0")
    assert "\n" not in line


def test_misspelt_config_key_suggests_the_right_one(tmp_path):
    user_error(train(tmp_path, "--config.trainer.totl_steps=3"),
               "--config.trainer.totl_steps", "no field 'totl_steps'", 'Did you mean "total_steps"')


def test_wrong_type_override_names_the_flag(tmp_path):
    user_error(train(tmp_path, "--config.trainer.total_steps=many"),
               "--config.trainer.total_steps=many", "invalid literal for int()")


def test_missing_config_file_names_it(tmp_path):
    user_error(cli("train", "--config", "configs/nope.py", "--workdir", tmp_path / "run"),
               "configs/nope.py", "cannot be loaded", "No such file", "configs/toy.py")


def test_unknown_model_preset_lists_the_presets(tmp_path):
    user_error(train(tmp_path, "--config.model.preset=qwen9"),
               "config.model.preset", "'qwen9'", "qwen2.5-7b")


def test_batch_sizes_that_do_not_divide(tmp_path):
    user_error(train(tmp_path, "--config.trainer.mini_batch_size=100"),
               "config.trainer.mini_batch_size", "must divide train_batch_size * rollout.n")


def test_more_devices_than_exist(tmp_path):
    user_error(train(tmp_path, "--config.mesh.num_devices=64"), "config.mesh.num_devices",
               "asks for 64 devices")


def test_malformed_reward_fn(tmp_path):
    user_error(train(tmp_path, "--config.reward.fn=not_an_import_path"),
               "config.reward.fn", "package.module:function")


def test_reward_fn_that_cannot_be_imported(tmp_path):
    user_error(train(tmp_path, "--config.reward.fn=no_such_package.rewards:score"),
               "config.reward.fn='no_such_package.rewards:score'", "cannot import module")


def test_unknown_flag(tmp_path):
    user_error(train(tmp_path, "--total_steps=3"), "total_steps", "--helpfull")


def test_verbose_adds_the_traceback(tmp_path):
    proc = train(tmp_path, "--config.trainer.total_steps=0", "--verbose")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert "error: Invalid config: config.trainer.total_steps" in proc.stderr


# ------------------------------------------------------------------------------ workdir
def test_missing_workdir_flag():
    user_error(cli("train", *TOY), "--workdir is required", "--workdir DIR")


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    user_error(train(tmp_path), f"--workdir {tmp_path / 'run'}", "is a file, not a folder")


def test_workdir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"  # under a file: no user (root included) can create it
    user_error(cli("train", *TOY, "--workdir", workdir), f"--workdir {workdir}",
               "cannot be written", "pass a folder you can create and write to")


# ------------------------------------------------------------------------------ data files
def test_missing_train_file_names_it_and_the_known_datasets(tmp_path):
    missing = tmp_path / "nope.parquet"
    user_error(train(tmp_path, f"--config.data.train={missing}"),
               str(missing), "does not exist", "dapo-math-17k", "DAPO_DATA_DIR")


def test_corrupt_parquet_names_its_file(tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    user_error(train(tmp_path, *SMALL, f"--config.data.train={bad}"),
               str(bad), "not a readable parquet file", "truncated")


def test_parquet_without_the_dapo_columns(tmp_path):
    path = tmp_path / "wrong_schema.parquet"
    pq.write_table(pa.table({"question": ["1 + 1"], "answer": ["2"]}), path)
    user_error(train(tmp_path, *SMALL, f"--config.data.train={path}"),
               str(path), "lacks column(s) ['prompt', 'reward_model']", "DAPO schema")


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    user_error(train(tmp_path, *SMALL, f"--config.data.train={empty}"),
               str(empty), "has no usable rows", "fix the file")


def test_data_file_with_only_malformed_rows(tmp_path):
    bad = write_jsonl(tmp_path / "bad_rows.jsonl", ["{not json", {"problem": "", "answer": "1"}])
    user_error(train(tmp_path, *SMALL, f"--config.data.train={bad}"),
               str(bad), "has no usable rows", "every row malformed")


def test_unknown_dataset_name(tmp_path, problems):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "p1", "response": "2"}])
    proc = cli("evaluate", *TOY, "--config.data.val=aime2099", "--responses", responses,
               "--out", tmp_path / "out")
    user_error(proc, "dataset 'aime2099'", "does not exist", "aime2024", "math500")


def test_unknown_val_dataset_fails_before_the_model_is_built(tmp_path):
    user_error(train(tmp_path, *SMALL, "--config.data.val=toy,aime2099"),
               "dataset 'aime2099'", "does not exist")
    assert not (tmp_path / "run" / "toy_tokenizer").exists()


# ------------------------------------------------------------------------------ model and tokenizer
def test_missing_model_path(tmp_path):
    missing = tmp_path / "no_model"
    user_error(train(tmp_path, *SMALL, "--config.model.preset=", f"--config.model.path={missing}"),
               str(missing), "does not exist", "config.json + *.safetensors")


def test_model_directory_without_config_json(tmp_path):
    d = hf_dir(tmp_path, None)
    user_error(cli("evaluate", *TOY, "--checkpoint", d, "--out", tmp_path / "out"),
               str(d / "config.json"), "not found", "Hugging Face checkpoint directory")


def test_corrupt_config_json(tmp_path):
    d = hf_dir(tmp_path, '{"model_type": "qwen2", ')
    user_error(cli("evaluate", *TOY, "--checkpoint", d, "--out", tmp_path / "out"),
               str(d / "config.json"), "is not valid JSON", "download the checkpoint again")


def test_unsupported_model_type(tmp_path):
    d = hf_dir(tmp_path, {**toy_hf_config(), "model_type": "gpt2"})
    user_error(cli("evaluate", *TOY, "--checkpoint", d, "--out", tmp_path / "out"),
               "Unsupported model_type 'gpt2'", "qwen2", "llama")


def test_truncated_safetensors_says_truncated(tmp_path):
    from dapo_jax.models.safetensors_io import save_file
    d = hf_dir(tmp_path, toy_hf_config())
    shard = d / "model.safetensors"
    save_file({"model.embed_tokens.weight": np.zeros((64, 32), np.float32)}, shard)
    shard.write_bytes(shard.read_bytes()[:-1000])  # a copy that stopped early
    user_error(cli("evaluate", *TOY, "--checkpoint", d, "--out", tmp_path / "out"),
               str(shard), "is truncated", "download the checkpoint again")


def test_missing_tokenizer_path(tmp_path):
    missing = tmp_path / "no_tokenizer"
    user_error(train(tmp_path, *SMALL, f"--config.tokenizer.path={missing}"),
               str(missing), "cannot load a tokenizer", "config.tokenizer.path")


# ------------------------------------------------------------------------------ resume
def test_resume_with_a_changed_batch_size(tmp_path):
    one_step = [*SMALL, "--config.trainer.total_steps=1", "--config.trainer.save_every=1",
                "--config.algo.dynamic_sampling.enable=False", "--config.eval.max_problems=2",
                "--config.trainer.mini_batch_size=16", "--config.trainer.micro_batch_size=16"]
    first = train(tmp_path, *one_step, "--config.trainer.train_batch_size=2",
                  "--config.trainer.gen_batch_size=2")
    assert first.returncode == 0, first.stderr[-3000:]
    proc = train(tmp_path, *one_step, "--config.trainer.total_steps=2",
                 "--config.trainer.train_batch_size=4", "--config.trainer.gen_batch_size=4")
    user_error(proc, "checkpoint at step 1", "trainer.train_batch_size=2",
               "trainer.gen_batch_size=4", "--config.trainer.gen_batch_size=2", "new --workdir")


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_needs_a_checkpoint_or_responses(tmp_path):
    user_error(cli("evaluate", *TOY, "--out", tmp_path / "out"), "--checkpoint", "--responses")


def test_evaluate_unknown_flag(tmp_path):
    user_error(cli("evaluate", *TOY, "--chekpoint", tmp_path), "chekpoint")


def test_evaluate_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_run"
    user_error(cli("evaluate", *TOY, "--checkpoint", missing, "--out", tmp_path / "out"),
               f"--checkpoint {missing}", "not a training workdir", "does not exist")


def test_missing_responses_file(tmp_path, problems):
    missing = tmp_path / "no_responses.jsonl"
    user_error(score(tmp_path, problems, missing), str(missing), "does not exist", "JSONL")


def test_responses_file_with_broken_json(tmp_path, problems):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "p1", "response": "2"}, '{"id": "p2",'])
    user_error(score(tmp_path, problems, responses), f"{responses}, line 2", "not valid JSON")


def test_responses_row_without_response(tmp_path, problems):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "p1", "answer": "2"}])
    user_error(score(tmp_path, problems, responses), f"{responses}, line 1",
               "needs a 'response' field")


def test_responses_with_an_unknown_problem_id(tmp_path, problems):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "p9", "response": "2"}])
    user_error(score(tmp_path, problems, responses), f"{responses}, line 1",
               "unknown problem id 'p9'", "'p1'")


def test_responses_missing_problems_need_allow_partial(tmp_path, problems):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "p1", "response": "2"}])
    user_error(score(tmp_path, problems, responses), str(responses),
               "1 problems have no response", "--allow_partial")


# ------------------------------------------------------------------------------ plan and demo
def test_plan_unknown_topology():
    user_error(cli("plan", *TOY, "--topology", "v9-8"),
               "Unknown topology 'v9-8'", "v5p-N", "--devices N with --hbm_gib X")


def test_plan_needs_a_topology():
    user_error(cli("plan", *TOY, "--devices", "2"), "give a topology", "--hbm_gib")


def test_demo_invalid_override(tmp_path):
    user_error(cli("demo", "--workdir", tmp_path / "demo", "--config.rollout.top_p=2"),
               "config.rollout.top_p", "must be in (0, 1]")


def test_demo_misspelt_override(tmp_path):
    user_error(cli("demo", "--workdir", tmp_path / "demo", "--config.rollout.topp=0.5"),
               "--config.rollout.topp", "no field 'topp'")


# ------------------------------------------------------------------------------ the wrapper itself
def test_internal_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        cli_errors.run_cli(lambda: 1 / 0, argv=["prog"])


def test_user_errors_exit_2_with_one_paragraph(capsys):
    def bad():
        raise cli_errors.UserError("Invalid config:\n  config.a: must be 1\n  config.b: must be 2")
    with pytest.raises(SystemExit) as exit_info:
        cli_errors.run_cli(bad, argv=["prog"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: Invalid config: config.a: must be 1; config.b: must "
                                       "be 2\n")


# ------------------------------------------------------------------------------ checkpoints and mesh
def tiny_gguf(path: pathlib.Path, *, drop: str) -> pathlib.Path:
    """A one-layer Qwen2 GGUF file (float32, random) without the tensor named `drop`."""
    import gguf
    vocab, hidden, heads, kv_heads, head_dim, ffn = 32, 16, 2, 1, 8, 24
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("embedding_length", hidden), ("feed_forward_length", ffn),
                       ("block_count", 1), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("context_length", 64),
                       ("vocab_size", vocab)):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (heads * head_dim, hidden),
              "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_q.bias": (heads * head_dim,), "blk.0.attn_k.bias": (kv_heads * head_dim,),
              "blk.0.attn_v.bias": (kv_heads * head_dim,),
              "blk.0.attn_output.weight": (hidden, heads * head_dim),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        if name != drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_missing_a_tensor_names_the_file_and_the_tensor(tmp_path):
    path = tiny_gguf(tmp_path / "model.gguf", drop="blk.0.ffn_down.weight")
    user_error(cli("evaluate", *TOY, "--checkpoint", path, "--out", tmp_path / "out"),
               str(path), "'blk.0.ffn_down.weight'", "model.layers.0.mlp.down_proj.weight",
               "convert or download it again")


def test_mesh_that_does_not_tile_the_devices_names_the_mesh_fields(tmp_path):
    # configs/toy.py runs on mesh.num_devices=1: a tensor axis of 2 cannot fit.
    user_error(cli("evaluate", *TOY, "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
                   "--checkpoint", tmp_path / "hf", "--out", tmp_path / "out"),
               "mesh.tensor=2", "config.mesh.num_devices=1", "lower the mesh.* sizes")


def test_training_mesh_that_does_not_tile_the_devices_names_the_mesh_fields(tmp_path):
    # mesh.tensor=3 on the toy config's one device: the mesh fields, not a derived batch size.
    user_error(train(tmp_path, "--config.mesh.fsdp=1", "--config.mesh.tensor=3"),
               "mesh.tensor=3", "lower the mesh.* sizes")


def test_export_needs_an_existing_workdir(tmp_path):
    missing = tmp_path / "no_run"
    user_error(cli("export", "--workdir", missing, "--out", tmp_path / "hf"),
               f"--workdir {missing}", "does not exist")


def test_export_of_a_workdir_without_checkpoints(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    user_error(cli("export", "--workdir", tmp_path / "run", "--out", tmp_path / "hf"),
               "holds no complete checkpoint", "before its first save")


def test_export_of_an_unknown_step_lists_the_available_ones(tmp_path):
    from dapo_jax.training.checkpointing import CheckpointStore
    store = CheckpointStore(tmp_path / "run")
    for step in (2, 4):  # a stand-in checkpoint: the step check comes before any array is read
        store.save(step, params={"w": np.zeros(2, np.float32)},
                   opt_state={"m": np.zeros(2, np.float32)}, arrays={}, meta={"step": step})
    store.close()
    user_error(cli("export", "--workdir", tmp_path / "run", "--step", "3", "--out", tmp_path / "hf"),
               "--step 3", "available steps: [2, 4]")


def test_export_needs_exactly_one_source(tmp_path):
    user_error(cli("export", "--out", tmp_path / "hf"), "--workdir", "--model")
