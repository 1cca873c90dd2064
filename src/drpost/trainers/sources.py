"""Where a CLI training run's model, data, verifier and reward model come from: ``Sources``.

Each trainer's ``build(config, device, sources)`` (``drpost.trainers.sft|dpo|rlhf|rlvr``) takes everything it does
not own through a ``Sources`` and sees only what it returns: models, token rows / records, and plain callables for
evaluation and rewards. This base class knows what the library itself reads: Hugging Face causal LMs by hub name or
local path, data files and ``datasets`` names (``drpost.data``), the ``drpost.data.verifiers`` checks, and a reward
model given by path (``reward_model``). ``drpost.world.runs.WorldSources`` adds the benchmark world -- its base
model (``model.name_or_path=world``), its settings (``data.setting``), its verifier (``grpo.verifier=world``) and
its learned reward model -- and is what the ``drpost`` command line runs the trainers with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# a record's own answer check: check(decoded response, record) -> bool or 0/1 reward
Check = Callable[[str, dict], float]


class Sources:
    """Hub / local models and data files only; subclasses add built-in models, settings, checks, reward models."""

    #: built-in model names (``model.name_or_path``) -> ``loader(config.model) -> (model, tokenizer)``
    models: Mapping[str, Callable] = {}

    def load_model(self, mc, device: torch.device):
        """(model in train mode on ``device``, tokenizer) for ``config.model`` (``drpost.trainers.setup``)."""
        from drpost.trainers.setup import load_model

        return load_model(mc, device, self.models)

    def sft_setting(self, config, tokenizer):
        """The ``SFTData`` of the built-in setting ``config.data.setting`` (a ConfigError: there are none here)."""
        raise _no_settings()

    def rl_setting(self, config, paradigm: str, tokenizer, test: list[dict] | None):
        """The ``RLData`` of the built-in setting ``config.data.setting`` for ``paradigm`` (dpo, rlhf, rlvr);
        ``test`` holds the ``data.eval`` records when given (a ConfigError: there are none here)."""
        raise _no_settings()

    def sft_data(self, config, tokenizer):
        from drpost.trainers.setup import load_sft_data

        return load_sft_data(config, tokenizer, self.sft_setting)

    def rl_data(self, config, paradigm: str, tokenizer):
        from drpost.trainers.rl_common import load_rl_data

        return load_rl_data(config, paradigm, tokenizer, self.rl_setting)

    def record_check(self, records: list[dict]) -> Check | None:
        """The records' own answer check (``grpo.verifier=world``, and greedy exact match ``em`` in evaluation) when
        every record carries what it needs; None otherwise."""
        return None

    def reward_model(self, data, config):
        """``(RewardModel, info)`` that scores the run's data when no ``reward_model`` path is given; None: none."""
        return None


def _no_settings():
    from drpost.config import ConfigError

    return ConfigError("option 'data.general': this run has no built-in settings (data.setting); set data.general "
                       "and data.target")
