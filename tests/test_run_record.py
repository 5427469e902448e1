"""A run describes itself in <workdir>/run/: resolved config and its diff from configs/base.py, git
commit, package versions, sources, a tokenizer copy evaluate can load, and the console log."""

import json
import logging
import re
import sys
from importlib import metadata

import jax
from transformers import AutoTokenizer

from configs import base, toy
from dapo_jax.training import run_record
from scripts import multihost_check as mc


def test_run_record_holds_config_diff_commit_versions_sources_and_tokenizer(
        tmp_path, qwen_tokenizer_dir):
    c = toy.get_config()
    c.trainer.total_steps = 7
    d = run_record.write_run_record(c, tmp_path, tokenizer_dir=qwen_tokenizer_dir)
    assert d == tmp_path / "run"
    config = json.loads((d / "config.json").read_text())
    assert config["trainer"]["total_steps"] == 7 and config["data"]["val"] == ["toy"]
    assert config["rollout"]["max_new_tokens"] == c.data.max_response_length  # reference resolved
    diff = json.loads((d / "config_diff.json").read_text())
    assert diff["trainer.total_steps"] == {"default": 100, "value": 7}
    assert diff["model.preset"] == {"default": "", "value": "toy"}
    assert "optim.b1" not in diff  # equal to the default
    defaults = json.loads(base.get_base_config().to_json_best_effort())
    assert all(k.split(".")[0] in defaults for k in diff)
    commit = (d / "git_commit").read_text().strip()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}", commit), commit
    versions = json.loads((d / "versions.json").read_text())
    assert versions["python"] == sys.version.split()[0]
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "transformers"):
        assert versions[name] == metadata.version(name)
    sources = json.loads((d / "sources.json").read_text())
    assert sources["tokenizer"] == str(qwen_tokenizer_dir) and sources["model_preset"] == "toy"
    assert "tokenizer.json" in sources["tokenizer_files"]
    copied = AutoTokenizer.from_pretrained(run_record.recorded_tokenizer(tmp_path))
    original = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    text = "Answer: 104<|im_end|>"
    assert copied(text)["input_ids"] == original(text)["input_ids"]
    assert copied.chat_template == original.chat_template


def test_tee_console_copies_what_is_printed_into_the_run_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    handler = logging.StreamHandler(sys.stderr)  # like absl's / basicConfig's, made before the tee
    logging.getLogger().addHandler(handler)
    try:
        path = run_record.tee_console(tmp_path)
        print("step 1/2 | score 0.5")
        print("a warning", file=sys.stderr)
        logging.getLogger("data_pipeline.rendering").warning("3 of 8 prompts are longer")
        sys.stdout.flush()
    finally:
        logging.getLogger().removeHandler(handler)
    assert path == str(tmp_path / "run" / "console.log")
    text = (tmp_path / "run" / "console.log").read_text()
    assert "step 1/2 | score 0.5\n" in text and "a warning\n" in text
    assert "3 of 8 prompts are longer" in text  # logging goes to the console log too
    assert "step 1/2 | score 0.5" in capsys.readouterr().out  # still on the console


def test_wandb_settings_are_off_unless_a_project_is_set():
    c = toy.get_config()
    assert run_record.wandb_settings(c) is None
    c.logging.wandb_project = "dapo"
    s = run_record.wandb_settings(c)
    assert s["project"] == "dapo" and s["config"]["seed"] == c.seed


def test_a_training_run_writes_its_record_and_console_log(tmp_path):
    """A real `python -m dapo_jax.train` (1 step) leaves <workdir>/run/ complete."""
    workdir = tmp_path / "wd"
    overrides = mc.toy_overrides({"mesh.num_devices": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
                                  "trainer.total_steps": 1})
    run = mc.launch(workdir, overrides, devices_per_process=1, timeout=300,
                    compilation_cache_dir=jax.config.jax_compilation_cache_dir,
                    log_dir=tmp_path / "logs")
    assert run.returncodes == [0], run.log_tail()
    d = workdir / "run"
    assert json.loads((d / "config.json").read_text())["trainer"]["total_steps"] == 1
    assert json.loads((d / "config_diff.json").read_text())["trainer.total_steps"]["value"] == 1
    assert (d / "tokenizer" / "tokenizer.json").read_bytes() == \
        (workdir / "toy_tokenizer" / "tokenizer.json").read_bytes()
    console = (d / "console.log").read_text()
    assert "train.py --config configs/toy.py" in console.splitlines()[0]  # the command line
    assert "step 1/1" in console, console[-2000:]
