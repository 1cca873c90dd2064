"""The rewards and DPO pairs of the real-model DPO / RLVR / RLHF benchmarks (``drpost.bench.real_rl``, whose module
docstring explains the choices): RLVR's shaped reward with partial credit, target EM's strict check, and the DPO pairs
whose rejected side is the base model's own greedy reply. Tested by ``tests/bench/test_real_rl.py``."""

from __future__ import annotations

import random

import torch

from drpost.bench.real_common import SYSTEM

PARTIAL = 0.25  # reward of a reply whose first line contains the answer as a whole token but is not only the answer
N_PAIRS = 256  # pool examples made into DPO pairs (one base-model generation each, cached)
REJECT_MAX_NEW = 16  # tokens of the base model's rejected replies


# ------------------------------------------------------------------------------------------------ rewards and pairs
def strict_check(reply: str, example: dict) -> bool:
    """Target EM's scoring: the reply's first line is the answer (``chat_render.verify_chat``)."""
    from drpost.world.chat_render import verify_chat

    return verify_chat(example["family"], reply, example["answer"])


def shaped_reward(reply: str, example: dict) -> float:
    """1.0 for a strict match, ``PARTIAL`` when the answer is a whole token of the first line, else 0.0."""
    from drpost.world.chat_render import answer_in_line

    if strict_check(reply, example):
        return 1.0
    return PARTIAL if answer_in_line(reply, example["answer"]) else 0.0


def reward_fn(tokenizer):
    """RLVR's reward_fn(prompt ids, response ids, examples) -> (R,) shaped rewards of the decoded replies."""
    from drpost.trainers.rl_common import decode_response

    def fn(prompts, responses, examples):
        return torch.tensor([shaped_reward(decode_response(tokenizer, r), e) for e, r in zip(examples, responses)])

    return fn


def chosen_text(tokenizer, example: dict) -> str:
    """The SFT row's completion without its end-of-turn token (``encode_preference`` appends EOS to each side)."""
    text = example["completion"]
    eos = tokenizer.eos_token
    if not example["add_eos"] and eos and text.rstrip().endswith(eos):
        text = text.rstrip()[:-len(eos)]
    return text


def dpo_pair(tokenizer, example: dict, reply: str, rng: random.Random) -> dict:
    """A chat-rendered example (``chat_examples``) and the base model's reply -> a DPO pair (see the module doc)."""
    from drpost.world.tasks import corrupt_answer

    chosen, rejected = chosen_text(tokenizer, example), reply.strip()
    source = "base_reply"
    if not rejected or rejected == chosen or strict_check(rejected, example):
        source, rejected = "corrupted", corrupt_answer(rng, example["answer"])
        if rejected == chosen:  # a noisy example's label can be the corruption drawn
            rejected = chosen + "x"
    return {**example, "chosen": chosen, "rejected": rejected, "flipped": bool(example["noisy"]),
            "rejected_source": source}


def base_replies(model, tokenizer, examples: list[dict]) -> list[str]:
    """Greedy replies of ``model`` to world examples (batched; ``REJECT_MAX_NEW`` tokens)."""
    from drpost.world.chat_render import generate_replies

    model.eval()
    return generate_replies(model, tokenizer, examples, batch_size=64, max_new_tokens=REJECT_MAX_NEW, system=SYSTEM)


def pair_pool(built, setting: str, seed: int) -> list[dict]:
    """The pool examples made into DPO pairs: a seeded subsample of ``N_PAIRS``, in pool order."""
    rng = random.Random(f"{seed}-{setting}-dpo-pairs")
    keep = sorted(rng.sample(range(len(built.general)), min(N_PAIRS, len(built.general))))
    return [built.general[i] for i in keep]
