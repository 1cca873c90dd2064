"""The RLHF reward model: a sequence-classification head on the base model, trained with the Bradley-Terry loss.

    from drpost.trainers.reward_model import train_reward_model, RewardModel
    rm, metrics = train_reward_model(base_path_or_model, tokenizer, pairs, steps=400)
    scores = rm.score(prompt_ids, response_ids)           # (B,) one scalar per (prompt, response)

Owns ``RewardModel`` (a ``LlamaForSequenceClassification``-style model with ``num_labels=1``, read at the last real
token, right padding) and ``train_reward_model`` (pairs ``{"prompt", "chosen", "rejected"}``; loss
``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`` averaged over the pairs; AdamW). ``world_reward_model(setting)``
trains the world setting's reward model once and caches it on disk next to the base model
(``$DRPOST_CACHE``/``~/.cache/drpost``), keyed by a hash of the base model, the pairs and the recipe.

Run it: ``python -c "from drpost.trainers.reward_model import world_reward_model as w; print(w('rlhf_format',
verbose=True)[1])"`` (trains or loads the cached model, prints its pair accuracy); ``drpost rlhf`` does it on
first use.
"""

from __future__ import annotations

import hashlib
import json
import random
import time

import torch
import torch.nn.functional as F

from drpost.trainers.rl_common import encode_prompt


class RewardModel:
    """Scores (prompt, response) token sequences with a sequence classifier (one logit)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _batch(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        seqs = [p + r for p, r in zip(prompts, responses)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)  # (B, T) right-padded
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, :len(s)] = 1
        dev = next(self.model.parameters()).device
        return ids.to(dev), attn.to(dev)

    def forward(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """(B,) scores with grad: the head's logit at each row's last real token."""
        ids, attn = self._batch(prompts, responses)
        out = self.model.model(input_ids=ids, attention_mask=attn)
        h = out.last_hidden_state  # (B, T, H)
        last = attn.sum(-1) - 1  # (B,)
        return self.model.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]], chunk: int = 256) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.forward(prompts[s:s + chunk], responses[s:s + chunk])
                          for s in range(0, len(prompts), chunk)])


def _encode_answer(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def encode_pairs(tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen response ids, rejected response ids); responses end with EOS, as rollouts do."""
    return [(encode_prompt(tokenizer, p["prompt"]), _encode_answer(tokenizer, p["chosen"]),
             _encode_answer(tokenizer, p["rejected"])) for p in pairs]


def load_classifier(path, dtype=torch.float32):
    """A one-logit sequence classifier initialized from a causal LM checkpoint (new head: small normal init)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype,
                                                              attn_implementation="eager")


@torch.no_grad()
def pair_accuracy(rm: RewardModel, enc: list[tuple]) -> float:
    if not enc:
        return float("nan")
    p, c, r = zip(*enc)
    return float((rm.score(list(p), list(c)) > rm.score(list(p), list(r))).float().mean())


def train_reward_model(model, tokenizer, pairs: list[dict], steps: int = 400, batch_size: int = 32,
                       lr: float = 1e-3, seed: int = 0, eval_pairs: list[dict] | None = None,
                       log_every: int = 0) -> tuple[RewardModel, dict]:
    """Bradley-Terry training of ``model`` (a sequence classifier, trained in place) on preference pairs."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    enc = encode_pairs(tokenizer, pairs)
    rm = RewardModel(model, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        idx = [rng.randrange(len(enc)) for _ in range(batch_size)]
        p = [enc[i][0] for i in idx]
        scores = rm.forward(p + p, [enc[i][1] for i in idx] + [enc[i][2] for i in idx])  # (2B,)
        loss = -F.logsigmoid(scores[:batch_size] - scores[batch_size:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[reward model] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    metrics = {"loss_curve": losses[:: max(1, steps // 50)], "final_loss": sum(losses[-20:]) / min(20, len(losses)),
               "train_pair_accuracy": pair_accuracy(rm, enc[:500]), "seconds": time.perf_counter() - t0}
    if eval_pairs:
        metrics["eval_pair_accuracy"] = pair_accuracy(rm, encode_pairs(tokenizer, eval_pairs))
    return rm, metrics


RM_RECIPE = {"steps": 500, "batch_size": 32, "lr": 1e-3, "seed": 0, "version": 1}


def world_reward_model(setting="rlhf_format", size: str = "tiny", recipe: dict | None = None,
                       verbose: bool = False) -> tuple[RewardModel, dict]:
    """The world setting's reward model, trained on its preference pairs once and cached on disk."""
    from drpost.world.pretrain import cache_dir, ensure_base_model
    from drpost.world.rl_settings import build_rl_setting
    from drpost.world.tasks import make_example

    recipe = {**RM_RECIPE, **(recipe or {})}
    data = build_rl_setting(setting, 0)
    base = ensure_base_model(size)
    key_src = json.dumps({"base": base.name, "recipe": recipe, "pairs": data.pairs[:50], "n": len(data.pairs),
                          "setting": data.setting.name}, sort_keys=True, default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = cache_dir() / f"reward-{data.setting.name}-{size}-{key}"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # held-out check pairs on the target prompts (the behaviour that matters)
    rng = random.Random("rm-eval")
    from drpost.world.rl_settings import make_pair

    eval_pairs = [make_pair(rng, make_example(rng, data.setting.target_family, data.setting.target_format),
                            data.setting.junk_rate) for _ in range(200)]
    if (path / "reward.json").exists():
        model = load_classifier(path)
        return RewardModel(model.eval(), tokenizer), json.loads((path / "reward.json").read_text())
    model = load_classifier(base)
    rm, metrics = train_reward_model(model, tokenizer, data.pairs, steps=recipe["steps"],
                                     batch_size=recipe["batch_size"], lr=recipe["lr"], seed=recipe["seed"],
                                     eval_pairs=eval_pairs, log_every=100 if verbose else 0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    (path / "reward.json").write_text(json.dumps({**metrics, "recipe": recipe}, indent=1))
    return rm, metrics
