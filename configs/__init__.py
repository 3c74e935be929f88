"""The presets, shipped in the package as `isic_jax.configs` (this folder, mapped by
pyproject.toml). Each file has `get_config()`; presets import the default and override only what
differs. A config file of your own does the same:

    from isic_jax.configs import default

    def get_config():
        config = default.get_config()
        config.model.name = "resnet18"
        return config

`isic-jax train --config NAME` takes a preset by name (`default`, `smoke`, `cpu_sample`, `demo`)
or any config file by path.
"""
