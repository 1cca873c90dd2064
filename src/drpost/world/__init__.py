"""The benchmark world (DESIGN.md section 6): procedural tasks, paper-shaped settings, a tiny base model, evaluation.

Modules (imported lazily, so ``import drpost.world`` stays cheap):
- ``tasks``: task families, formats, label noise, verifiers, messages / RL forms;
- ``settings``: ``Setting``, ``SETTINGS``, ``build_setting(setting, seed) -> SettingData``;
- ``tokenizer``: ``build_tokenizer()`` (byte-level Hugging Face fast tokenizer);
- ``model`` / ``pretrain``: ``load_base_model(size)`` and ``python -m drpost.world.pretrain --size tiny``;
- ``evaluate``: ``exact_match``, ``exact_match_by_family``, ``eval_loss``, ``greedy_generate``;
- ``demo``: the ``drpost demo`` command.
"""
