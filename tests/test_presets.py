"""The architecture presets have one definition, the YAML under conf/: the TF importer and dfl-bench read it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dfl import presets
from dfl.cli.bench import MODELS
from dfl.hydra_resolvers import CONF_DIR
from dfl.models import ContextAggregationNet
from dfl.tf_import import AUTHORS_DENOISER_CONFIG, AUTHORS_HEADS, AUTHORS_LOSSNET_CONFIG


def test_importer_and_bench_use_the_yaml_presets():
    yaml = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "can_authors.yaml"))
    assert AUTHORS_DENOISER_CONFIG["dilations"] == yaml["dilations"] == [*[2**i for i in range(13)], 1]
    assert {k: AUTHORS_DENOISER_CONFIG[k] for k in ("bn_eps", "bn_scale", "padding")} == {
        "bn_eps": 1e-3, "bn_scale": False, "padding": "tf_authors"}  # fmt: skip
    # what a checkpoint of the imported network records is the architecture the YAML defines
    assert ContextAggregationNet(**presets.architecture_preset("model", "can_authors")).config == AUTHORS_DENOISER_CONFIG
    lossnet = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "lossnet" / "authors.yaml"))
    assert AUTHORS_LOSSNET_CONFIG == {**{k: v for k, v in lossnet.items() if k not in ("_target_", "checkpoint")},
                                      "heads": AUTHORS_HEADS}  # fmt: skip
    assert MODELS["can_authors"] == presets.architecture_preset("model", "can_authors")
    assert MODELS["can_paper"]["dilations"][:2] == [1, 1] and MODELS["can_paper"]["padding"] == "same"


def test_a_preset_is_read_from_its_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(Path(CONF_DIR) / "model", conf / "model")
    edited = OmegaConf.load(conf / "model" / "can_authors.yaml")
    edited.channels = 16
    OmegaConf.save(edited, conf / "model" / "can_authors.yaml")
    monkeypatch.setattr(presets, "CONF_DIR", str(conf))
    got = presets.architecture_preset("model", "can_authors")
    assert got["channels"] == 16 and "_target_" not in got and "fused" not in got
    with pytest.raises(FileNotFoundError, match=r"model[/\\]can_huge\.yaml"):
        presets.architecture_preset("model", "can_huge")
