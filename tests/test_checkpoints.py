import pickle

import pytest
import torch

import dfl.models
from dfl.checkpoints import CheckpointError, load_model, model_record, save_model
from dfl.models import ContextAggregationNet, LossNetwork


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


def _edited(tmp_path, kind, net, **config):
    """A model file whose config was edited after saving (the weights stay as they were)."""
    record = model_record(kind, net)
    record["config"].update(config)
    path = tmp_path / f"{kind}.pt"
    torch.save(record, path)
    return path


@pytest.mark.parametrize(
    "kind, edit, message",
    [
        ("denoiser", dict(channels=40000), r"channels=40000 is out of range \[1, 4096\]"),
        ("denoiser", dict(dilations=[1] * 20000), "dilations has 20000 entries"),
        ("denoiser", dict(channels=16), r"convs.0.weight of shape \(16, 1, 3\) but the weights hold \(8, 1, 3\)"),
        ("denoiser", dict(dilations=[1] * 9), "describes 9 layers but the weights hold 7"),
        ("denoiser", dict(kernel_size=5), "convs.0.weight of shape"),
        ("denoiser", dict(channels="8"), "channels='8' is not an integer"),
        ("denoiser", dict(dilations=[1, 2, 0, 1, 1, 1, 1]), r"dilations\[...\]=0 is out of range"),
        ("lossnet", dict(n_layers=100000), "n_layers=100000 is out of range"),
        ("lossnet", dict(n_layers=30), "asks for 65536 channels in its last layers"),
        ("lossnet", dict(base_channels=64), "convs.0.weight of shape"),
        ("lossnet", dict(channel_block=0), "channel_block=0 is out of range"),
    ],
)
def test_edited_configs_fail_before_any_network_is_built(tmp_path, monkeypatch, kind, edit, message):
    net = ContextAggregationNet(dilations=[1, 1, 2, 4, 8, 16, 1], channels=8) if kind == "denoiser" else LossNetwork(
        n_layers=6, base_channels=4, channel_block=2)
    path = _edited(tmp_path, kind, net, **edit)

    def no_network(*args, **kwargs):  # the memory (or time) would go here: nothing may be built
        raise AssertionError("a network was built from an unchecked config")

    monkeypatch.setattr(dfl.models, "ContextAggregationNet", no_network)
    monkeypatch.setattr(dfl.models, "LossNetwork", no_network)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path, kind)
    assert str(path) in str(err.value)


def test_checked_configs_still_load(tmp_path):
    for kind, net in (("denoiser", ContextAggregationNet(dilations=[1, 2, 1], channels=8, kernel_size=5)),
                      ("lossnet", LossNetwork(n_layers=7, base_channels=4, channel_block=3, heads={"a": 3}))):
        path = save_model(tmp_path / f"{kind}.pt", kind, net)
        assert load_model(path, kind).config == net.config
