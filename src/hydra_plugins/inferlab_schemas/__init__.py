"""Registers inferlab's config schemas in Hydra's ConfigStore whenever Hydra starts.

Hydra imports every module under the `hydra_plugins` namespace when it initialises, and so does DVC's Hydra
composition (`dvc exp run`), so `conf/config.yaml` can name the schemas in its defaults list in both paths.
Importing this must stay light: only the dataclasses, no torch.
"""

from inferlab.config import register_configs

register_configs()
