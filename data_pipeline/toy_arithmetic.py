"""A seeded synthetic arithmetic task for the CPU demo, with worked solutions for a supervised warm start."""
from __future__ import annotations

import dataclasses
import hashlib
import random

from data_pipeline.records import PromptRecord, get_template

TOY_DATA_SOURCE = "toy_arithmetic"
TOY_SPLITS = ("train", "heldout")
_OPERATORS = "+-*"


@dataclasses.dataclass(frozen=True)
class ToyArithmeticConfig:
    """Difficulty and size knobs of the toy task; equal configs give equal datasets."""

    seed: int = 0
    num_train: int = 2000
    num_heldout: int = 200
    min_operands: int = 2
    max_operands: int = 3
    min_digits: int = 1
    max_digits: int = 2
    operators: str = "+-*"
    template: str = "short"  # "short" keeps prompts ~20-40 tokens; "dapo" is the full DAPO wording
    heldout_fraction: float = 0.1  # share of the problem space reserved for held-out
    # Fixed-shape problem kinds instead of the operand / digit / operator knobs above: a comma-separated
    # list of "D op E" (digit counts of the two operands), each problem drawing a kind uniformly,
    # e.g. "3+3,2*1" = 3-digit addition and 2-digit by 1-digit multiplication. Empty = the knobs.
    kinds: str = ""

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.operators or set(self.operators) - set(_OPERATORS):
            raise ValueError(f"operators={self.operators!r}; use a non-empty subset of {_OPERATORS!r}")
        if self.num_train < 0 or self.num_heldout < 0:
            raise ValueError(f"num_train/num_heldout must be >= 0, got {self.num_train}, {self.num_heldout}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        get_template(self.template)
        parse_kinds(self.kinds)


def parse_kinds(kinds: str) -> list[tuple[int, str, int]]:
    """The (digits, operator, digits) kinds of `ToyArithmeticConfig.kinds` ("3+3,2*1"); [] when empty."""
    parsed = []
    for kind in (k.strip() for k in kinds.split(",") if k.strip()):
        op = next((o for o in _OPERATORS if o in kind), None)
        left, _, right = kind.partition(op) if op else ("", "", "")
        if not (left.strip().isdigit() and right.strip().isdigit()) or not (
                1 <= int(left) <= 9 and 1 <= int(right) <= 9):
            raise ValueError(f"kinds entry {kind!r} is not 'D op E' with digit counts 1-9 and op in "
                             f"{_OPERATORS!r}, e.g. kinds='3+3,2*1'")
        parsed.append((int(left), op, int(right)))
    return parsed


def _tokens(expression: str) -> list[str]:
    """Splits a generated expression ("12 + 7 * 3") into alternating operand / operator tokens."""
    tokens = expression.split(" ")
    if len(tokens) % 2 == 0 or any(t not in _OPERATORS for t in tokens[1::2]):
        raise ValueError(f"{expression!r} is not a space-separated 'a op b op c' toy expression")
    return tokens


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def solution_steps(expression: str) -> list[tuple[int, str, int, int]]:
    """The (a, op, b, result) steps of evaluating with school precedence: all `*` first, then left to right."""
    tokens = _tokens(expression)
    values = [int(t) for t in tokens[0::2]]
    ops = tokens[1::2]
    steps = []
    while "*" in ops:
        i = ops.index("*")
        result = values[i] * values[i + 1]
        steps.append((values[i], "*", values[i + 1], result))
        values[i : i + 2] = [result]
        del ops[i]
    while ops:
        result = _apply(values[0], ops[0], values[1])
        steps.append((values[0], ops[0], values[1], result))
        values[0:2] = [result]
        del ops[0]
    return steps


def evaluate_expression(expression: str) -> int:
    """The value of a toy expression (the ground truth)."""
    return solution_steps(expression)[-1][3]


def toy_worked_solution(record: PromptRecord | str) -> str:
    """A step-by-step solution for a toy record (or bare expression) ending with the DAPO `Answer:` line."""
    expression = record if isinstance(record, str) else record["extra"]["expression"]
    steps = solution_steps(expression)
    lines = [f"{a} {op} {b} = {result}" for a, op, b, result in steps]
    lines.append(f"Answer: {steps[-1][3]}")
    return "\n".join(lines)


def _is_heldout(expression: str, fraction: float) -> bool:
    """Split by a hash of the problem itself, so a problem's split never depends on seed or sizes."""
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < round(fraction * 10_000)


def _draw_operand(rng: random.Random, digits: int) -> str:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return str(rng.randint(low, 10**digits - 1))


def _draw_expression(rng: random.Random, config: ToyArithmeticConfig) -> str:
    kinds = parse_kinds(config.kinds)
    if kinds:
        left, op, right = rng.choice(kinds)
        return f"{_draw_operand(rng, left)} {op} {_draw_operand(rng, right)}"
    n = rng.randint(config.min_operands, config.max_operands)
    parts = []
    for i in range(n):
        if i:
            parts.append(rng.choice(config.operators))
        parts.append(_draw_operand(rng, rng.randint(config.min_digits, config.max_digits)))
    return " ".join(parts)


def toy_record(expression: str, split: str, index: int, template: str = "short") -> PromptRecord:
    """A PromptRecord for one expression, phrased in the DAPO instruction style."""
    problem = f"What is {expression}?"
    return {
        "id": f"toy-{split}-{index}",
        "data_source": TOY_DATA_SOURCE,
        "prompt": [{"role": "user", "content": get_template(template).wrap(problem)}],
        "ground_truth": str(evaluate_expression(expression)),
        "extra": {"expression": expression, "split": split},
    }


def generate_toy_arithmetic(config: ToyArithmeticConfig = ToyArithmeticConfig()) -> dict[str, list[PromptRecord]]:
    """Draws distinct problems with a seeded RNG and splits them into disjoint "train" and "heldout" lists."""
    wanted = {"train": config.num_train, "heldout": config.num_heldout}
    found: dict[str, list[str]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    rng = random.Random(config.seed)
    # Rejection sampling: bound the draws so a too-small problem space fails loudly instead of spinning.
    max_draws = 50 * (config.num_train + int(config.num_heldout / config.heldout_fraction)) + 1000
    for _ in range(max_draws):
        if all(len(found[s]) >= wanted[s] for s in wanted):
            break
        expression = _draw_expression(rng, config)
        if expression in seen:
            continue
        seen.add(expression)
        split = "heldout" if _is_heldout(expression, config.heldout_fraction) else "train"
        if len(found[split]) < wanted[split]:
            found[split].append(expression)
    else:
        if any(len(found[s]) < wanted[s] for s in wanted):
            raise ValueError(
                f"found only {len(found['train'])} train / {len(found['heldout'])} held-out distinct problems "
                f"for {config}; ask for fewer or widen max_digits / max_operands / operators"
            )
    return {
        split: [toy_record(e, split, i, config.template) for i, e in enumerate(found[split])] for split in TOY_SPLITS
    }
