"""The benchmark world (docs/design.md, section 9): procedural tasks, paper-shaped settings, a tiny base model,
evaluation.

Modules (imported lazily, so ``import drpost.world`` stays cheap):
- ``tasks``: task families, formats, label noise, verifiers, messages / RL forms;
- ``settings``: ``Setting``, ``SETTINGS``, ``build_setting(setting, seed) -> SettingData``;
- ``tokenizer``: ``build_tokenizer()`` (byte-level Hugging Face fast tokenizer);
- ``arch`` / ``model`` / ``pretrain``: the sizes and config, ``load_base_model(size)``, and
  ``python -m drpost.world.pretrain --size tiny``;
- ``evaluate``: ``exact_match``, ``exact_match_by_family``, ``eval_loss``, ``greedy_generate``;
- ``chat_render``: the world's tasks as chat turns for a real model's tokenizer.
The ``drpost demo`` command that runs on this world lives in ``drpost.bench.demo``.
"""
