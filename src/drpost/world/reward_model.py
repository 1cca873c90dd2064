"""The learned reward model of the world's RLHF setting, trained once and cached on disk.

Owns ``RM_RECIPE`` and ``world_reward_model(setting, size)``: the setting's reward model
(``drpost.trainers.reward_model``, Bradley-Terry on the setting's preference pairs) trained from the world's base
model of ``size`` and cached next to it (``$DRPOST_CACHE``/``~/.cache/drpost``), keyed by a hash of the base model,
the pairs and the recipe. It also reports its pair accuracy on 200 held-out pairs of the target prompts.

Run it: ``python -c "from drpost.world.reward_model import world_reward_model as w; print(w('rlhf_format',
verbose=True)[1])"`` (trains or loads the cached model, prints its metrics); ``drpost rlhf`` and
``drpost bench quality --paradigm rlhf`` do it on first use.
"""

from __future__ import annotations

import hashlib
import json
import random

from drpost.trainers.reward_model import RewardModel, load_classifier, train_reward_model

RM_RECIPE = {"steps": 500, "batch_size": 32, "lr": 1e-3, "seed": 0, "version": 1}


def world_reward_model(setting="rlhf_format", size: str = "tiny", recipe: dict | None = None,
                       verbose: bool = False) -> tuple[RewardModel, dict]:
    """The world setting's reward model, trained on its preference pairs once and cached on disk."""
    from transformers import AutoTokenizer

    from drpost.world.pretrain import cache_dir, ensure_base_model
    from drpost.world.rl_settings import build_rl_setting, make_pair
    from drpost.world.tasks import make_example

    recipe = {**RM_RECIPE, **(recipe or {})}
    data = build_rl_setting(setting, 0)
    base = ensure_base_model(size)
    key_src = json.dumps({"base": base.name, "recipe": recipe, "pairs": data.pairs[:50], "n": len(data.pairs),
                          "setting": data.setting.name}, sort_keys=True, default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = cache_dir() / f"reward-{data.setting.name}-{size}-{key}"
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # held-out check pairs on the target prompts (the behaviour that matters)
    rng = random.Random("rm-eval")
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
