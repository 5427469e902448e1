"""The demo's reporting: held-out summary from metrics.jsonl rows and the curves PNG."""

import os

from dapo_jax.demo import heldout_summary, plot_curves

KEY = "val-core/toy/acc/mean@4"


def _metrics():
    rows = [{"step": 0, KEY: 0.3}]
    for step in range(1, 11):
        rows.append({"step": step, "response_length/mean": 20.0 + step, "actor/entropy": 0.2 / step,
                     "train/acc_before_filter": 0.3 + 0.05 * step})
        if step % 5 == 0:
            rows[-1][KEY] = 0.3 + 0.06 * step
    return rows


def test_heldout_summary_takes_first_and_last_validation():
    key, first, last = heldout_summary(_metrics())
    assert key == KEY and first == (0, 0.3) and last[0] == 10 and abs(last[1] - 0.9) < 1e-9
    assert heldout_summary(_metrics()[:3]) is None  # a single validation is no curve
    assert heldout_summary([{"step": 1, "actor/entropy": 0.1}]) is None


def test_plot_curves_writes_a_png(tmp_path):
    path = os.path.join(tmp_path, "curves.png")
    plot_curves(_metrics(), path, eval_note=" (top-p 0.7)", rollout_note=" (T=1)")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_demo_takes_config_overrides_like_training():
    from dapo_jax.demo import _load_config

    c = _load_config("configs/toy.py", ["--config.trainer.total_steps=5",
                                        "--config.data.val=toy,toy"])
    assert c.trainer.total_steps == 5 and c.data.val == ("toy,toy",)  # split by validation
    assert _load_config("configs/toy.py:naive_grpo").algo.dynamic_sampling.enable is False


def test_demo_rejects_arguments_that_are_not_config_overrides(capsys):
    import pytest

    from dapo_jax.demo import main

    with pytest.raises(SystemExit) as e:
        main(["--trainer.total_steps=5"])
    assert e.value.code == 2
    assert "--config.a.b=value" in capsys.readouterr().err
