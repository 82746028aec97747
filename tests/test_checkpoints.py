import pickle

import pytest
import torch

from dfl.checkpoints import CheckpointError, load_model, save_model
from dfl.models import ContextAggregationNet


def test_roundtrip(tmp_path):
    net = ContextAggregationNet(dilations=[1, 2], channels=4)
    path = save_model(tmp_path / "m.pt", "denoiser", net)
    back = load_model(path, "denoiser")
    assert back.config == net.config
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_wrong_kind_and_missing_file(tmp_path):
    save_model(tmp_path / "m.pt", "denoiser", ContextAggregationNet(dilations=[1], channels=2))
    with pytest.raises(CheckpointError, match="expected a 'lossnet'"):
        load_model(tmp_path / "m.pt", "lossnet")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt", "denoiser")


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"dfl_format": 1, "payload": Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(path, "denoiser")
    assert not (tmp_path / "PWNED").exists()
