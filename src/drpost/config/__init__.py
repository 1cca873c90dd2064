"""Run configuration (a package: ``schema.py``, ``bench.py``, ``parse.py``, ``render.py``): the dataclasses that are the single source of truth for every option, and their parser.

Owns
- the config dataclasses: shared groups (``ModelConfig``, ``RegularizerConfig``, ``OptimConfig``, ``DataConfig``,
  ``LogConfig``), trainer groups (``DPOParams``, ``PPOParams``, ``GRPOParams``) and one top-level config per
  subcommand (``DemoConfig``, ``SFTConfig``, ``DPOConfig``, ``RLHFConfig``, ``RLVRConfig``, ``BenchConfig``), listed
  in the explicit table ``CONFIGS``. Every field carries its help text in ``field(metadata={"help": ...})``, plus
  optional checks ``min`` / ``max`` / ``gt`` (strictly greater) / ``choices`` / ``pattern``.
- ``parse_config(cls, argv)``: defaults <- YAML files (``--config a.yaml``, overrides only, nested by group, applied
  in order) <- command-line overrides (``group.key=value``, ``--group.key value``, ``--group.key=value``, applied in
  order). Values are coerced from the annotations (int, float, bool, str, Literal, Optional, unions, lists, tuples),
  unknown keys are rejected with the closest valid name, and ranges are checked. YAML is read with
  ``yaml.safe_load`` only: a config can never import or run code.
- ``to_dict`` / ``save_resolved`` (writes ``config.yaml`` into a run directory; it re-loads with ``--config``),
  ``validate``, ``help_text(cls)`` (the CLI's ``--help``) and ``config_reference_markdown()``.

Regenerate the reference:  python -m drpost.config            (writes docs/configuration.md)
Check it is up to date:    python -m drpost.config --check
"""

from drpost.config.bench import (  # noqa: F401
    BENCH_CONFIGS,
    CONFIGS,
    BenchConfig,
    BenchMesoConfig,
    BenchRealConfig,
    BenchSystemConfig,
)
from drpost.config.parse import leaf_options, load_yaml, parse_config, refuse_unread, validate  # noqa: F401
from drpost.config.render import (  # noqa: F401
    command_of,
    config_reference_markdown,
    help_text,
    main,
    save_resolved,
    to_dict,
)
from drpost.config.schema import (  # noqa: F401
    GROUPS,
    Baseline,
    BenchMethod,
    ConfigError,
    DataConfig,
    DataFormat,
    DemoConfig,
    DPOConfig,
    DPOParams,
    GRPOParams,
    LogConfig,
    Method,
    ModelConfig,
    OptimConfig,
    PPOParams,
    RegularizerConfig,
    RLHFConfig,
    RLVRConfig,
    RunConfig,
    SamplerConfig,
    Scoring,
    SFTConfig,
)

__all__ = ['BENCH_CONFIGS', 'Baseline', 'BenchConfig', 'BenchMesoConfig', 'BenchRealConfig', 'BenchMethod', 'BenchSystemConfig', 'CONFIGS', 'ConfigError', 'DPOConfig', 'DPOParams', 'DataConfig', 'DataFormat', 'DemoConfig', 'GROUPS', 'GRPOParams', 'LogConfig', 'Method', 'ModelConfig', 'OptimConfig', 'PPOParams', 'RLHFConfig', 'RLVRConfig', 'RegularizerConfig', 'RunConfig', 'SFTConfig', 'SamplerConfig', 'Scoring', 'command_of', 'config_reference_markdown', 'help_text', 'leaf_options', 'load_yaml', 'main', 'parse_config', 'refuse_unread', 'save_resolved', 'to_dict', 'validate']
