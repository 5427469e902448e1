"""The toy arithmetic generator, its worked solutions, and the toy tokenizer."""
import json
import re

import pytest
from transformers import AutoTokenizer

from data_pipeline import ToyArithmeticConfig, build_toy_tokenizer, generate_toy_arithmetic, toy_worked_solution

SMALL = ToyArithmeticConfig(seed=3, num_train=300, num_heldout=40)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _expressions(records):
    return [r["extra"]["expression"] for r in records]


def test_toy_generator_is_deterministic_with_disjoint_splits():
    first, again = generate_toy_arithmetic(SMALL), generate_toy_arithmetic(SMALL)
    assert first == again
    train, heldout = _expressions(first["train"]), _expressions(first["heldout"])
    assert (len(train), len(heldout)) == (300, 40)
    assert len(set(train)) == 300 and len(set(heldout)) == 40
    assert not set(train) & set(heldout)
    other = generate_toy_arithmetic(ToyArithmeticConfig(seed=4, num_train=300, num_heldout=40))
    assert _expressions(other["train"]) != train
    # The split depends on the problem only: no seed ever puts a held-out problem into train.
    assert not set(_expressions(other["train"])) & set(heldout)
    assert not set(train) & set(_expressions(other["heldout"]))


def test_toy_ground_truth_equals_python_evaluation():
    for record in generate_toy_arithmetic(SMALL)["train"]:
        assert record["ground_truth"] == str(eval(record["extra"]["expression"]))  # noqa: S307 - digits/+-* only


def test_toy_difficulty_knobs_bound_operands_digits_and_operators():
    config = ToyArithmeticConfig(
        seed=1, num_train=200, num_heldout=20, min_operands=3, max_operands=4, min_digits=2, max_digits=3,
        operators="+*",
    )
    for record in generate_toy_arithmetic(config)["train"]:
        tokens = record["extra"]["expression"].split(" ")
        numbers, ops = tokens[0::2], tokens[1::2]
        assert 3 <= len(numbers) <= 4
        assert all(2 <= len(n) <= 3 and not n.startswith("0") for n in numbers)
        assert set(ops) <= {"+", "*"}


def test_toy_worked_solution_steps_are_correct_and_end_with_the_answer_line():
    for record in generate_toy_arithmetic(SMALL)["heldout"]:
        lines = toy_worked_solution(record).split("\n")
        assert lines[-1] == f"Answer: {record['ground_truth']}"
        for line in lines[:-1]:
            left, right = line.split(" = ")
            assert int(right) == eval(left)  # noqa: S307 - one "a op b" step
        # Every operator of the expression is resolved by exactly one step.
        assert len(lines) - 1 == len(re.findall(r" [-+*] ", record["extra"]["expression"]))
    assert toy_worked_solution("12 + 7 * 3") == "7 * 3 = 21\n12 + 21 = 33\nAnswer: 33"


def test_toy_prompts_use_the_dapo_style_template():
    record = generate_toy_arithmetic(SMALL)["train"][0]
    content = record["prompt"][0]["content"]
    assert "Answer: $Answer" in content and f"What is {record['extra']['expression']}?" in content
    dapo = generate_toy_arithmetic(ToyArithmeticConfig(num_train=2, num_heldout=1, template="dapo"))
    assert dapo["train"][0]["prompt"][0]["content"].startswith("Solve the following math problem step by step.")


def test_toy_generator_refuses_a_problem_space_too_small_for_the_request():
    tiny = ToyArithmeticConfig(num_train=500, num_heldout=10, max_operands=2, max_digits=1, operators="+")
    with pytest.raises(ValueError, match="widen"):
        generate_toy_arithmetic(tiny)
    with pytest.raises(ValueError, match="operators"):
        ToyArithmeticConfig(operators="/")


@pytest.fixture(scope="module")
def toy_corpus():
    splits = generate_toy_arithmetic(SMALL)
    return [r["prompt"][0]["content"] for r in splits["train"]] + [toy_worked_solution(r) for r in splits["train"]]


def test_toy_tokenizer_loads_with_autotokenizer_and_round_trips_text(tmp_path, toy_corpus):
    out = build_toy_tokenizer(tmp_path / "tok", toy_corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) <= 384
    for text in [toy_corpus[0], toy_corpus[-1], "Unseen: naïve 😀 text\twith\nbytes 0042"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    for token in SPECIALS:
        assert len(tokenizer(token)["input_ids"]) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    digits = tokenizer("9081726354")["input_ids"]
    assert [tokenizer.decode([i]) for i in digits] == list("9081726354")


def test_toy_tokenizer_chat_template_and_short_prompts(tmp_path, toy_corpus):
    tokenizer = AutoTokenizer.from_pretrained(str(build_toy_tokenizer(tmp_path / "tok", toy_corpus)))
    record = generate_toy_arithmetic(SMALL)["heldout"][0]
    text = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>user\n{record['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    heldout = generate_toy_arithmetic(SMALL)["heldout"]
    lengths = [len(tokenizer(r["prompt"][0]["content"])["input_ids"]) for r in heldout]
    assert 20 <= min(lengths) and max(lengths) <= 40  # template words merged into single tokens


def test_toy_tokenizer_is_deterministic(tmp_path, toy_corpus):
    a = build_toy_tokenizer(tmp_path / "a", toy_corpus)
    b = build_toy_tokenizer(tmp_path / "b", list(toy_corpus))
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert json.loads((a / "tokenizer_config.json").read_text())["chat_template"]
