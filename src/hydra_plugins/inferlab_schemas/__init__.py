"""Registers inferlab's config schemas in Hydra's ConfigStore whenever Hydra starts.

Hydra and DVC's Hydra composition (`dvc exp run`) import every `hydra_plugins` module when they
start, so `conf/config.yaml` can name the schemas in its defaults list in both paths.
Importing this must stay light: only the dataclasses, no torch.
"""

from inferlab.config import register_configs

register_configs()
