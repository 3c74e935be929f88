"""Configs: the schema and its checks (`schema`), presets by name and the saved config of a
run (`files`), friendlier errors for command-line overrides (`flags`).

    validate_config(config)              # ConfigError naming the key, before anything is built
    config_file("smoke")                 # a shipped preset's file, for --config NAME
    save_config(config, workdir)         # workdir/config.json (also stored in every checkpoint)
    config = load_config(workdir)        # what `evaluate` runs with
"""

from isic_jax.config_utils.files import (
    CONFIG_FILENAME,
    config_differences,
    config_file,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    save_config,
)
from isic_jax.config_utils.flags import friendly_override_errors
from isic_jax.config_utils.schema import (
    BEST_METRICS,
    DEFAULT_NUM_FOLDS,
    INIT_HEAD,
    LOWERINGS,
    MODEL_DTYPES,
    PARALLELISM,
    TASKS,
    THRESHOLD_METHODS,
    ConfigError,
    best_metric_mode,
    check_value,
    reference_keys,
    validate_config,
)

__all__ = [
    "BEST_METRICS",
    "CONFIG_FILENAME",
    "DEFAULT_NUM_FOLDS",
    "INIT_HEAD",
    "LOWERINGS",
    "MODEL_DTYPES",
    "PARALLELISM",
    "TASKS",
    "THRESHOLD_METHODS",
    "ConfigError",
    "best_metric_mode",
    "check_value",
    "config_differences",
    "config_file",
    "config_from_dict",
    "config_to_dict",
    "friendly_override_errors",
    "load_config",
    "preset_names",
    "reference_keys",
    "save_config",
    "validate_config",
]
