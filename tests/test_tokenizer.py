"""The real Qwen2.5 tokenizer loads from ../shared/data and renders chat prompts."""

import pytest

from dapo_jax.models import load_tokenizer


def test_qwen25_tokenizer_loads_and_renders_a_chat_prompt(qwen_tokenizer_dir):
    tok = load_tokenizer(qwen_tokenizer_dir)
    assert len(tok) == 151_665  # shared/data/README.md: 151,643 BPE tokens + 22 special tokens
    messages = [{"role": "user", "content": "What is 1+1?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is 1+1?<|im_end|>" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_missing_tokenizer_error_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
