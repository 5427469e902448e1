"""One whole DAPO training step against an independent PyTorch reference, and its invariances.

The trainer runs with injected rollouts (fixed responses of known token lengths: some end in EOS, some
are cut at the length limit) and a reward function with known outcomes. Everything between the
rollouts and the new parameters is the trainer's own wiring: the soft overlong punishment (in tokens),
dynamic sampling (one group of equal accuracy is dropped), group advantages, the overlong filter,
old log-probs, micro-batching with the global token count, the clipped objective at the rollout
temperature, gradient clipping and one AdamW step with LR warmup. The reference recomputes all of it
from the same initial weights with transformers' Qwen2 model, written from the paper's equations:
the loss, the gradient, and the parameters after the update must agree to 1e-5. The same step must
give the same gradient and parameters (1e-6) for micro-batches of 8, 4, 2 and 1 samples and on 1, 2
and 8 devices.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch

import jax
from dapo_jax import models
from dapo_jax.sampler.rollout import RolloutResult, Sample
from dapo_jax.training.trainer import Trainer
from tests.test_trainer import small_config

G = 4  # samples per prompt
R = 12  # max response length (= rollout.max_new_tokens)
L_CACHE = 4  # overlong buffer: lengths 9..12 are punished linearly, -1 at 12
PENALTY = 0.5
TEMPERATURE = 0.8
LR, WARMUP = 1e-2, 4  # step 0 trains at LR / WARMUP
# Adam's first step moves each weight by lr * g / (|g| + eps): with eps 1e-8 a gradient entry of
# 1e-8 (float32 round-off between two correct implementations) moves the weight by lr / 2. eps 1e-3
# keeps that sensitivity below 1e-7 while most entries still move by ~lr.
B1, B2, EPS, WD, CLIP = 0.9, 0.999, 1e-3, 0.1, 1.0
CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 10.0

# (token length, ends with EOS, accuracy) per sample; three prompts of G samples each.
# Group 1 is all correct: dynamic sampling drops it (its overlong penalties still differ, so
# filtering on the score instead of the accuracy would keep it). Lengths 12 without EOS are truncated:
# the overlong filter removes them from the loss, the penalty still reaches their group's advantages.
SAMPLES = [
    [(3, True, 1.0), (10, True, 0.0), (12, False, 1.0), (6, True, 0.0)],
    [(5, True, 1.0), (11, True, 1.0), (2, True, 1.0), (12, False, 1.0)],
    [(9, True, 0.0), (1, True, 1.0), (12, False, 0.0), (7, False, 0.0)],
]
KEPT_GROUPS = (0, 2)


class InjectedRollout:
    """A rollout backend returning fixed responses; records the prompts it was asked for."""

    def __init__(self, stop_id: int, vocab: int):
        self.stop_id, self.vocab = stop_id, vocab
        self.prompts: list[list[int]] = []
        self.params_updates = 0

    def generate(self, requests, *, seed=0, sampling=None, desc=""):
        rng = np.random.RandomState(1234)
        samples = []
        for r, req in enumerate(requests):
            assert req.n == G and req.max_new_tokens == R
            self.prompts.append(list(req.prompt))
            group = []
            for j, (length, eos, _) in enumerate(SAMPLES[r]):
                toks = rng.randint(3, self.vocab, size=length).astype(np.int32)
                toks[toks == self.stop_id] = 3
                if eos:
                    toks[-1] = self.stop_id
                group.append(Sample(toks, np.zeros(length, np.float32), np.zeros(length, np.float32),
                                    "eos" if eos else "length", text=f"sample {r} {j}"))
            samples.append(group)
        return RolloutResult(samples=samples, stats={})

    def update_params(self, params):
        self.params_updates += 1

    def release(self):
        pass


def known_rewards(texts, truths):
    """Accuracy from the sample table (the text names the sample); score +1 / -1 as math_dapo."""
    out = []
    for t in texts:
        _, r, j = t.split()
        acc = SAMPLES[int(r)][int(j)][2]
        out.append({"score": 1.0 if acc else -1.0, "acc": bool(acc), "pred": ""})
    return out


def step_config(*, micro: int, devices: int, mode: str = "token-mean", **extra):
    """The test's one-step config: one mini-batch (one AdamW update) of the two kept groups."""
    return small_config(**extra, **{
        "rollout.n": G, "data.max_response_length": R, "rollout.temperature": TEMPERATURE,
        "algo.overlong_buffer.enable": True, "algo.overlong_buffer.len": L_CACHE,
        "algo.overlong_buffer.penalty_factor": PENALTY, "algo.overlong_filter": True,
        "algo.dynamic_sampling.enable": True, "algo.dynamic_sampling.metric": "acc",
        "algo.dynamic_sampling.max_num_gen_batches": 1, "algo.loss_agg_mode": mode,
        "algo.clip_ratio_low": CLIP_LOW, "algo.clip_ratio_high": CLIP_HIGH,
        "algo.clip_ratio_c": CLIP_C, "trainer.gen_batch_size": 3, "trainer.train_batch_size": 2,
        "trainer.mini_batch_size": 2 * G, "trainer.micro_batch_size": micro,
        "trainer.total_steps": 1, "trainer.save_every": 100, "warm_start.steps": 0,
        "optim.lr": LR, "optim.warmup_steps": WARMUP, "optim.b1": B1, "optim.b2": B2,
        "optim.eps": EPS, "optim.weight_decay": WD, "optim.grad_clip": CLIP,
        "mesh.num_devices": devices,
    })


def _hf(tree, cfg) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in models.hf_state_dict(tree, cfg, "float32").items()}


def run_trainer_step(tmp_path, **kw):
    """One trainer step; returns its metrics, the rollout, and HF-named initial params, grad, params."""
    tr = Trainer(step_config(**kw), str(tmp_path), progress=False, reward_fn=known_rewards,
                 rollout=InjectedRollout(stop_id=0, vocab=0))
    # The layout under test is the one asked for (packed unless trainer.packing=False or legacy).
    assert tr.packing == (kw.get("trainer.packing", True) and kw.get("mode") != "verl-legacy-token-mean")
    tr.driver.stop_id, tr.driver.vocab = tr.exp.stop_ids[0], len(tr.tokenizer)
    before = _hf(jax.device_get(tr.params), tr.model_cfg)
    (metrics,) = tr.train()
    # AdamW's first moment after one step is (1 - b1) * the (clipped) gradient.
    mu = optax.tree_utils.tree_get(tr.opt_state, "mu")
    grad = {k: v / (1 - B1) for k, v in _hf(jax.device_get(mu), tr.model_cfg).items()}
    after = _hf(jax.device_get(tr.params), tr.model_cfg)
    out = dict(metrics=metrics, rollout=tr.driver, cfg=tr.model_cfg, before=before, grad=grad,
               after=after, stop_id=tr.exp.stop_ids[0])
    tr.close()
    return out


# ------------------------------------------------------------------------------------ the reference

def reference_step(run, mode: str, micro: int):
    """The paper's DAPO step in float64 PyTorch from the run's initial weights and rollouts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = run["cfg"]
    hf_cfg = Qwen2Config(**{k: v for k, v in models.to_hf_config(cfg).items()
                            if k not in ("torch_dtype", "architectures")})
    hf_cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(hf_cfg).double().eval()
    loaded = model.load_state_dict({k: torch.from_numpy(v) for k, v in run["before"].items()},
                                   strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, loaded
    if cfg.tie_word_embeddings:
        model.tie_weights()

    rng = np.random.RandomState(1234)  # the same draws as InjectedRollout
    rows = []  # (group, prompt ids, response ids, accuracy, eos)
    for r, prompt in enumerate(run["rollout"].prompts):
        for length, eos, acc in SAMPLES[r]:
            toks = rng.randint(3, run["rollout"].vocab, size=length)
            toks[toks == run["stop_id"]] = 3
            if eos:
                toks[-1] = run["stop_id"]
            rows.append((r, prompt, toks.tolist(), acc, eos))

    # Rewards: +1/-1 plus the soft overlong punishment in tokens (Eq. 13).
    def penalty(n):
        if n <= R - L_CACHE:
            return 0.0
        return ((R - L_CACHE) - n) / L_CACHE * PENALTY if n <= R else -PENALTY
    score = np.array([(1.0 if acc else -1.0) + penalty(len(resp)) for _, _, resp, acc, _ in rows])
    # Dynamic sampling (Eq. 11): keep groups whose accuracies are not all equal.
    keep = [g for g in range(len(SAMPLES)) if len({s[2] for s in SAMPLES[g]}) > 1]
    assert tuple(keep) == KEPT_GROUPS
    kept = [i for i, row in enumerate(rows) if row[0] in keep]
    # Group advantages (Eq. 9): (r - mean) / (std + 1e-6), unbiased std as torch.std.
    adv = {}
    for g in keep:
        idx = [i for i in kept if rows[i][0] == g]
        s = torch.tensor(score[idx])
        a = (s - s.mean()) / (s.std() + 1e-6)
        adv.update(zip(idx, a.tolist()))
    # Overlong filtering: truncated samples (length limit, no EOS) leave the loss entirely.
    in_loss = {i: not (len(rows[i][2]) >= R and not rows[i][4]) for i in kept}
    total_tokens = sum(len(rows[i][2]) for i in kept if in_loss[i])

    def response_logprobs(i):
        _, prompt, resp, _, _ = rows[i]
        ids = torch.tensor([prompt + resp])
        logits = model(ids).logits[0, len(prompt) - 1:-1] / TEMPERATURE
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]

    def per_token_loss(lp, old_lp, a):
        ratio = torch.exp(lp - old_lp)
        l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
        clipped = torch.maximum(l1, l2)
        return torch.where(torch.tensor(a < 0), torch.minimum(clipped, torch.tensor(-a * CLIP_C)),
                           clipped)

    old = {i: response_logprobs(i).detach() for i in kept}
    model.zero_grad()
    loss = torch.zeros((), dtype=torch.float64)
    for m in range(0, len(kept), micro):
        chunk = [i for i in kept[m:m + micro] if in_loss[i]]
        terms = [per_token_loss(response_logprobs(i), old[i], adv[i]) for i in chunk]
        if mode == "token-mean":  # Eq. 12: every token of the mini-batch weighs 1 / total tokens
            part = sum(t.sum() for t in terms) / total_tokens if terms else 0.0
        else:  # verl's FSDP actor: the micro-batch's own token mean, / gradient-accumulation steps
            n = sum(t.numel() for t in terms)
            part = (sum(t.sum() for t in terms) / n if n else 0.0) / (len(kept) // micro)
        loss = loss + part
    loss.backward()

    names = list(run["before"])
    params = dict(model.named_parameters())
    grads = {k: params[k].grad.detach().numpy().copy() if params[k].grad is not None
             else np.zeros_like(run["before"][k]) for k in names if k in params}
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    grad_norm = np.sqrt(sum(float((g ** 2).sum()) for k, g in grads.items()
                            if k != "lm_head.weight" or not cfg.tie_word_embeddings))
    scale = min(1.0, CLIP / grad_norm)
    clipped = {k: g * scale for k, g in grads.items()}
    # AdamW step 1 (torch semantics: decoupled decay, bias-corrected moments), lr with warmup.
    lr = LR * min(1.0, 1.0 / WARMUP)
    after = {}
    for k, g in clipped.items():
        m_hat = (1 - B1) * g / (1 - B1)
        v_hat = (1 - B2) * g * g / (1 - B2)
        p = run["before"][k]
        after[k] = p - lr * (m_hat / (np.sqrt(v_hat) + EPS) + WD * p)
    return dict(loss=float(loss.detach()), grad=clipped, grad_norm=grad_norm, after=after,
                score_mean=float(score[kept].mean()), tokens=total_tokens)


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b)


# ------------------------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def token_mean_runs(tmp_path_factory):
    """The same step with micro-batches of 8/4/2/1 samples on 1 device and of 8 on 2 and 8 devices."""
    runs = {}
    for micro, devices in ((2, 1), (8, 1), (4, 1), (1, 1), (8, 2), (8, 8)):
        runs[(micro, devices)] = run_trainer_step(tmp_path_factory.mktemp(f"tm_{micro}_{devices}"),
                                                  micro=micro, devices=devices)
    # The padded layout (fixed micro-batches of `micro` samples), and packed micro-batches of the
    # smallest token budget (one full-length row per device: many micro-batches, short buckets).
    for micro, devices in ((2, 1), (8, 2)):
        runs[("padded", micro, devices)] = run_trainer_step(
            tmp_path_factory.mktemp(f"padded_{micro}_{devices}"), micro=micro, devices=devices,
            **{"trainer.packing": False})
    full = step_config(micro=2, devices=1).data.max_prompt_length + R
    budget = -(-full // 16) * 16
    for devices in (1, 2):
        runs[("budget", budget, devices)] = run_trainer_step(
            tmp_path_factory.mktemp(f"budget_{devices}"), micro=2, devices=devices,
            **{"trainer.max_tokens_per_micro_batch": budget})
    return runs


@pytest.mark.parametrize("mode,layout", [("token-mean", "packed"), ("token-mean", "padded"),
                                         ("verl-legacy-token-mean", "padded")])
def test_one_step_equals_the_pytorch_reference(mode, layout, token_mean_runs, tmp_path):
    micro = 2  # four micro-batches of unequal token counts: the aggregation mode matters
    if mode == "token-mean":
        run = token_mean_runs[(micro, 1) if layout == "packed" else ("padded", micro, 1)]
    else:
        run = run_trainer_step(tmp_path, micro=micro, devices=1, mode=mode)
    ref = reference_step(run, mode, micro)
    m = run["metrics"]
    assert m["dynamic_sampling/dropped_groups"] == 1
    assert m["train/num_samples"] == len(KEPT_GROUPS) * G
    assert m["critic/score/mean"] == pytest.approx(ref["score_mean"], abs=1e-6)
    assert m["train/overlong_filtered"] == 2
    assert m["actor/loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert m["actor/grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert ref["grad_norm"] > CLIP  # the clip is active, so its wiring is tested too
    assert _max_diff(run["grad"], ref["grad"]) < 1e-5
    assert _max_diff(run["after"], ref["after"]) < 1e-5
    # The update really moved the weights by about the learning rate (the check above is not vacuous).
    assert _max_diff(run["after"], run["before"]) > 0.5 * LR / WARMUP


def test_token_mean_step_is_the_same_for_every_micro_batch_size_and_device_count(token_mean_runs):
    base = token_mean_runs[(8, 1)]
    for key, run in token_mean_runs.items():
        assert run["metrics"]["actor/loss"] == pytest.approx(base["metrics"]["actor/loss"],
                                                            abs=1e-6), key
        assert _max_diff(run["grad"], base["grad"]) < 1e-6, key
        assert _max_diff(run["after"], base["after"]) < 1e-6, key


def test_token_budget_micro_batches_are_really_exercised(token_mean_runs):
    """The smallest budget splits the update into several packed micro-batches on every rank;
    the default budget packs the mini-batch into fewer, fuller micro-batches."""
    budget = [k for k in token_mean_runs if k[0] == "budget"]
    assert budget
    for key in budget:
        m = token_mean_runs[key]["metrics"]
        assert m["perf/micro_batches_per_update"] >= 2, key
        assert 0 < m["perf/packing_fill"] <= 1, key
        assert m["perf/rank_token_imbalance"] >= 1.0, key
    roomy = token_mean_runs[(8, 1)]["metrics"]
    assert roomy["perf/micro_batches_per_update"] == 1
    assert "perf/packing_fill" not in token_mean_runs[("padded", 2, 1)]["metrics"]
