"""The RLHF reward model: a sequence-classification head on the base model, trained with the Bradley-Terry loss.

    from drpost.trainers.reward_model import train_reward_model, RewardModel
    rm, metrics = train_reward_model(base_path_or_model, tokenizer, pairs, steps=400)
    scores = rm.score(prompt_ids, response_ids)           # (B,) one scalar per (prompt, response)

Owns ``RewardModel`` (a ``LlamaForSequenceClassification``-style model with ``num_labels=1``, read at the last real
token, right padding) and ``train_reward_model`` (pairs ``{"prompt", "chosen", "rejected"}``; loss
``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`` averaged over the pairs; AdamW with the shared
``drpost.trainers.loop.warmup_decay`` schedule, 20 warm-up steps by default). The world's RLHF setting trains its
reward model with it once and caches it (``drpost.world.reward_model.world_reward_model``); the real-model RLHF
benchmark trains a LoRA on a real model's classifier (``lora_classifier``; ``drpost.bench.real_rlhf``).
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from drpost.trainers.loop import warmup_decay
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


def load_classifier(path, dtype=torch.float32, adapter=None):
    """A one-logit sequence classifier initialized from a causal LM checkpoint (new head: small normal init);
    ``adapter``: a folder saved from ``lora_classifier``'s peft model, loaded and merged into the weights."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype,
                                                               attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def lora_classifier(model, r: int = 8, alpha: float = 16.0):
    """LoRA (rank ``r``, every linear layer) on a sequence classifier whose score head stays fully trainable (peft
    ``SEQ_CLS``); returns (the peft model, to ``save_pretrained``; the classifier inside it, adapters in place, for
    ``RewardModel`` / ``train_reward_model``)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                  task_type="SEQ_CLS"))
    return peft_model, peft_model.base_model.model


@torch.no_grad()
def pair_accuracy(rm: RewardModel, enc: list[tuple]) -> float:
    if not enc:
        return float("nan")
    p, c, r = zip(*enc)
    return float((rm.score(list(p), list(c)) > rm.score(list(p), list(r))).float().mean())


def train_reward_model(model, tokenizer, pairs: list[dict], steps: int = 400, batch_size: int = 32,
                       lr: float = 1e-3, seed: int = 0, eval_pairs: list[dict] | None = None,
                       log_every: int = 0, warmup: int = 20,
                       train_accuracy_pairs: int = 500) -> tuple[RewardModel, dict]:
    """Bradley-Terry training of ``model`` (a sequence classifier, trained in place; frozen parameters stay so) on
    preference pairs; ``train_pair_accuracy`` is measured on the first ``train_accuracy_pairs`` pairs."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    enc = encode_pairs(tokenizer, pairs)
    rm = RewardModel(model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_decay(opt, steps, warmup=warmup)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        idx = [rng.randrange(len(enc)) for _ in range(batch_size)]
        p = [enc[i][0] for i in idx]
        scores = rm.forward(p + p, [enc[i][1] for i in idx] + [enc[i][2] for i in idx])  # (2B,)
        loss = -F.logsigmoid(scores[:batch_size] - scores[batch_size:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[reward model] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    metrics = {"loss_curve": losses[:: max(1, steps // 50)], "final_loss": sum(losses[-20:]) / min(20, len(losses)),
               "train_pair_accuracy": pair_accuracy(rm, enc[:train_accuracy_pairs]), "seconds": time.perf_counter() - t0}
    if eval_pairs:
        metrics["eval_pair_accuracy"] = pair_accuracy(rm, encode_pairs(tokenizer, eval_pairs))
    return rm, metrics
