"""Fixed-shape arithmetic kinds of the generated dataset (`data.toy.kinds`), used to train a real
pretrained model (configs/qwen2_5_coder_0_5b_arith.py)."""
import re

import ml_collections
import pytest

from data_pipeline import ToyArithmeticConfig, datasets, generate_toy_arithmetic
from data_pipeline.tfds_builders import load_tfds_records, toy_builder_config

ARITH = ToyArithmeticConfig(seed=0, num_train=400, num_heldout=60, kinds="3+3,2*1")
SHAPE = re.compile(r"^(\d+) ([+*]) (\d+)$")


def _shape(expression: str) -> tuple[int, str, int]:
    match = SHAPE.match(expression)
    assert match, expression
    a, op, b = match.groups()
    return len(a), op, len(b)


def test_kinds_draw_only_the_named_shapes_and_both_of_them():
    splits = generate_toy_arithmetic(ARITH)
    shapes = [_shape(r["extra"]["expression"]) for s in ("train", "heldout") for r in splits[s]]
    assert set(shapes) == {(3, "+", 3), (2, "*", 1)}
    # Multi-digit operands never start with 0 (a 3-digit operand is 100-999).
    for r in splits["train"]:
        a, _, b = r["extra"]["expression"].split(" ")
        assert len(a) == 1 or not a.startswith("0")
        assert len(b) == 1 or not b.startswith("0")


def test_kinds_ground_truth_equals_python_arithmetic():
    for record in generate_toy_arithmetic(ARITH)["heldout"]:
        a, op, b = record["extra"]["expression"].split(" ")
        expected = int(a) + int(b) if op == "+" else int(a) * int(b)
        assert record["ground_truth"] == str(expected)


def test_kinds_splits_are_disjoint_distinct_and_deterministic():
    first, again = generate_toy_arithmetic(ARITH), generate_toy_arithmetic(ARITH)
    assert first == again
    train = [r["extra"]["expression"] for r in first["train"]]
    heldout = [r["extra"]["expression"] for r in first["heldout"]]
    assert (len(set(train)), len(set(heldout))) == (400, 60)
    assert not set(train) & set(heldout)


def test_kinds_prompts_ask_for_the_answer_line():
    record = generate_toy_arithmetic(ARITH)["train"][0]
    text = record["prompt"][0]["content"]
    assert "Answer:" in text and record["extra"]["expression"] in text


@pytest.mark.parametrize("bad", ["3/3", "3+", "x+1", "0+1", "3+3,,2**1"])
def test_malformed_kinds_are_rejected_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="D op E"):
        ToyArithmeticConfig(kinds=bad)


def test_config_field_reaches_the_generator_and_is_optional():
    c = ml_collections.ConfigDict({"seed": 0, "data": {"template": "short", "toy": {
        "num_train": 10, "num_heldout": 2, "min_operands": 2, "max_operands": 2, "min_digits": 1,
        "max_digits": 2, "operators": "+-"}}})
    assert datasets.toy_config(c).kinds == ""  # configs written before the field still load
    c.data.toy.kinds = "3+3,2*1"
    assert datasets.toy_config(c).kinds == "3+3,2*1"


def test_kinds_get_their_own_tfds_cache(tmp_path):
    plain = ToyArithmeticConfig(seed=0, num_train=400, num_heldout=60)
    assert toy_builder_config(plain).name != toy_builder_config(ARITH).name
    records = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=ARITH)
    assert [r["id"] for r in records] == [r["id"] for r in generate_toy_arithmetic(ARITH)["train"]]


def test_qwen_arith_config_validates_and_generates_both_kinds():
    from configs import qwen2_5_coder_0_5b_arith
    from dapo_jax.config_validation import validate_config

    for variant in ("", "short"):
        c = qwen2_5_coder_0_5b_arith.get_config(variant)
        validate_config(c, training=True)
        assert c.model.path.endswith("qwen2.5-coder-0.5b-instruct.gguf")
        assert c.reward.scorer == "math_dapo" and not c.reward.fn  # the strict `Answer: N` reward
    splits = generate_toy_arithmetic(datasets.toy_config(c))
    assert len(splits["heldout"]) == c.eval.max_problems == 100
    shapes = {_shape(r["extra"]["expression"]) for r in splits["train"]}
    assert shapes == {(3, "+", 3), (2, "*", 1)}
