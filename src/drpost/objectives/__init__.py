"""Per-row losses: ``loss_fn(model, batch) -> (row_loss_sums (R,), row_token_counts (R,))``.

SFT (:mod:`.sft`), DPO (:mod:`.dpo`), PPO with a value head (:mod:`.ppo`), GRPO (:mod:`.grpo`), the RL target
objectives (:mod:`.rl_target`); rollout-side arithmetic (GAE, group advantages, KL control) in :mod:`.advantages`;
token-aligned log-probs in :mod:`.logprobs`.
"""

from drpost.objectives.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalized_rewards,
    masked_mean,
    whiten,
)
from drpost.objectives.dpo import DPOLoss, dpo_loss_fn, dpo_pair_losses
from drpost.objectives.grpo import GRPOLoss, group_sample_index, grpo_loss_fn
from drpost.objectives.logprobs import aligned_token_logps, reference_token_logps, sequence_logps, token_logps
from drpost.objectives.ppo import PolicyValueOutput, PolicyWithValue, PPOLoss, ValueHead, ppo_loss_fn
from drpost.objectives.rl_target import (
    RewardObjective,
    TokenPGObjective,
    normalize_rewards,
    rl_target_loss_fn,
)
from drpost.objectives.sft import causal_lm_loss, token_logprobs

__all__ = [
    "AdaptiveKLController",
    "DPOLoss",
    "FixedKLController",
    "GRPOLoss",
    "PPOLoss",
    "PolicyValueOutput",
    "PolicyWithValue",
    "RewardObjective",
    "TokenPGObjective",
    "ValueHead",
    "aligned_token_logps",
    "causal_lm_loss",
    "dpo_loss_fn",
    "dpo_pair_losses",
    "gae",
    "group_advantages",
    "group_sample_index",
    "grpo_loss_fn",
    "kl_penalized_rewards",
    "masked_mean",
    "normalize_rewards",
    "ppo_loss_fn",
    "reference_token_logps",
    "rl_target_loss_fn",
    "sequence_logps",
    "token_logprobs",
    "token_logps",
    "whiten",
]
