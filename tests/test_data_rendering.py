"""Prompt rendering with the real Qwen2.5 tokenizer: system-prompt choice and left truncation."""
import pytest
from transformers import AutoTokenizer

from data_pipeline import load_dapo_parquet, load_jsonl_problems, render_prompts


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def aime(shared_data):
    return load_jsonl_problems(shared_data / "aime2024.jsonl")[0]


def _chatml_user_turn(content):
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_no_system_prompt_means_no_system_block_even_with_qwens_default(qwen, aime):
    rendered = render_prompts(qwen, aime[:2], max_prompt_length=4096)
    for record, text, ids in zip(aime, rendered.texts, rendered.token_ids):
        assert text == _chatml_user_turn(record["prompt"][0]["content"])
        assert "You are Qwen" not in qwen.decode(ids)
        assert ids == qwen(text, add_special_tokens=False)["input_ids"]
    # Why the stripping is needed: the template on its own injects Qwen's default system prompt.
    assert "You are Qwen" in qwen.apply_chat_template(aime[0]["prompt"], tokenize=False, add_generation_prompt=True)


def test_given_system_prompt_is_rendered_as_the_system_message(qwen, aime):
    rendered = render_prompts(qwen, aime[:1], max_prompt_length=4096, system_prompt="Think carefully.")
    expected = "<|im_start|>system\nThink carefully.<|im_end|>\n" + _chatml_user_turn(aime[0]["prompt"][0]["content"])
    assert rendered.texts[0] == expected


def test_left_truncation_keeps_the_end_of_long_prompts_and_counts_them(qwen, aime):
    short = {**aime[0], "prompt": [{"role": "user", "content": "Hi"}]}
    rendered = render_prompts(qwen, [aime[0], short, aime[1]], max_prompt_length=32)
    full = [qwen(t, add_special_tokens=False)["input_ids"] for t in rendered.texts]
    assert rendered.token_ids[0] == full[0][-32:] and len(full[0]) > 32
    assert rendered.token_ids[1] == full[1] and len(full[1]) < 32
    assert qwen.decode(rendered.token_ids[2]).endswith('after "Answer:".<|im_end|>\n<|im_start|>assistant\n')
    assert rendered.num_truncated == 2
    assert rendered.stats["prompt_length/num_truncated"] == 2.0
    assert rendered.stats["prompt_length/max"] == 32.0


def test_without_chat_template_the_prompt_is_the_raw_message_text(qwen, aime):
    rendered = render_prompts(qwen, aime[:1], max_prompt_length=4096, apply_chat_template=False)
    assert rendered.texts[0] == aime[0]["prompt"][0]["content"]
    assert "<|im_start|>" not in qwen.decode(rendered.token_ids[0])


def test_dapo_math_17k_prompts_render_within_the_length_budget(qwen, shared_data):
    records = load_dapo_parquet(shared_data / "dapo-math-17k.parquet")[0][:64]
    rendered = render_prompts(qwen, records, max_prompt_length=2048)
    assert len(rendered.token_ids) == 64 and rendered.num_truncated == 0
    for record, ids in zip(records, rendered.token_ids):
        assert qwen.decode(ids) == _chatml_user_turn(record["prompt"][0]["content"])


def test_truncation_right_keeps_the_beginning_and_error_names_the_count(qwen, aime):
    short = {**aime[0], "prompt": [{"role": "user", "content": "Hi"}]}
    records = [aime[0], short, aime[1]]
    left = render_prompts(qwen, records, max_prompt_length=32)
    right = render_prompts(qwen, records, max_prompt_length=32, truncation="right")
    full = [qwen(t, add_special_tokens=False)["input_ids"] for t in right.texts]
    assert right.token_ids[0] == full[0][:32] and left.token_ids[0] == full[0][-32:]
    assert right.token_ids[1] == full[1] and right.num_truncated == 2
    with pytest.raises(ValueError, match=r"2 of 3 prompts are longer than "
                                         r"data.max_prompt_length=32.*data.truncation"):
        render_prompts(qwen, records, max_prompt_length=32, truncation="error")
    assert render_prompts(qwen, [short], max_prompt_length=32, truncation="error").num_truncated == 0
    with pytest.raises(ValueError, match="truncation must be one of"):
        render_prompts(qwen, records, max_prompt_length=32, truncation="middle")


def test_over_long_prompts_are_a_console_warning_with_their_count(qwen, aime, caplog):
    short = {**aime[0], "prompt": [{"role": "user", "content": "Hi"}]}
    with caplog.at_level("WARNING", logger="data_pipeline.rendering"):
        render_prompts(qwen, [aime[0], short, aime[1]], max_prompt_length=32)
    assert "2 of 3 prompts are longer than data.max_prompt_length=32" in caplog.text
    assert "data.truncation=left" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="data_pipeline.rendering"):
        render_prompts(qwen, [short], max_prompt_length=32)
    assert caplog.text == ""
