"""Data: record formats, loaders and token rows for every command (no model, no training).

Modules:
- ``formats``: the TRL record formats (prompt_completion, messages, text, preference, prompt_answer), detection,
  validation, ``DataError`` (every data problem, naming file:line);
- ``loaders``: reading .jsonl / .json / .parquet files and Hugging Face datasets into records
  (``load_records``), and records into token rows (``to_rows``, ``load_rows``; ``overlong`` policy);
- ``prompts``: preference pairs (``load_preference_pairs``, ``encode_preference``) and RL prompts
  (``load_prompts``) for ``drpost dpo|rlhf|rlvr``;
- ``verifiers``: answer checks of user RLVR data (``answer_matches``, ``make_verifier``: exact, numeric, contains);
- ``chat``: chat templates (the tokenizer's, or a plain fallback) and which tokens carry the loss;
- ``collate``: prompt/completion tokenization and padded batches (``collate``, ``collate_preference``).
"""
