"""The architecture presets, read from their one definition: the package's ``conf/model/*.yaml`` and
``conf/lossnet/*.yaml`` (what ``dfl-train model=NAME`` composes). The TF importer and ``dfl-bench`` build
their networks from these."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from dfl.hydra_resolvers import CONF_DIR

# keys of those files that are not the network's architecture
_NOT_ARCHITECTURE = ("_target_", "checkpoint", "fused")


def architecture_preset(group: str, name: str) -> dict:
    """The constructor arguments of the network that ``conf/<group>/<name>.yaml`` defines.

    Args:
        group: ``"model"`` (a ``ContextAggregationNet``) or ``"lossnet"`` (a ``LossNetwork``).
        name: the file's stem, e.g. ``"can_authors"``.

    Returns:
        A fresh dict of the architecture's settings (no ``_target_``, ``checkpoint`` or run options).

    Raises:
        FileNotFoundError: naming the file, when there is no such preset.
    """
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no architecture preset {path}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {key: value for key, value in config.items() if key not in _NOT_ARCHITECTURE}
