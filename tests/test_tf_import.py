"""dfl-import-tf: the TF tensor-bundle reader, the authors' variable mapping, the CLI, and parity
with the authors' TensorFlow graph (golden outputs in ../shared/reference/authors_tf).

Relative error of an array = max|ours − ref| / max|ref| (elementwise ratios blow up near zero).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dfl.checkpoints import load_model, safe_load
from dfl.cli.import_tf import main as cli_main
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.tf_import import (
    AUTHORS_DENOISER_CONFIG,
    AUTHORS_LOSSNET_CONFIG,
    CheckpointFormatError,
    TFCheckpoint,
    TFImportError,
    authors_config,
    import_denoiser,
    import_lossnet,
)
from dfl.tf_import.bundle import crc32c, mask_crc

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AUTHORS_TF = SHARED / "reference" / "authors_tf"
SAMPLES = SHARED / "data" / "vbdmd_sample"


# ---------------------------------------------------------------------------------------------
# A minimal, independent writer of the tensor-bundle format (LevelDB table + raw data file).

TF_DTYPE_CODES = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _f_varint(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v)


def _f_bytes(num: int, b: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(b)) + b


def _f_fixed32(num: int, v: int) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<I", v)


def _block(pairs, restart_interval: int = 2) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(pairs):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _write_table(path: Path, pairs, entries_per_block: int = 3, compression: int = 0) -> None:
    data = bytearray()

    def put(block: bytes, kind: int = 0) -> bytes:
        handle = _varint(len(data)) + _varint(len(block))
        data.extend(block + bytes([kind]) + struct.pack("<I", mask_crc(crc32c(block + bytes([kind])))))
        return handle

    index = []
    for start in range(0, len(pairs), entries_per_block):
        chunk = pairs[start : start + entries_per_block]
        index.append((chunk[-1][0], put(_block(chunk), compression)))
    meta_handle = put(_block([]))
    index_handle = put(_block(index, restart_interval=1))
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    path.write_bytes(bytes(data) + footer)


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], **table_kwargs) -> Path:
    """Write ``prefix.index`` + ``prefix.data-00000-of-00001`` holding ``tensors``."""
    raw = bytearray()
    pairs = [(b"", _f_varint(1, 1) + _f_bytes(3, _f_varint(1, 1)))]  # header: 1 shard, version 1
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(_f_bytes(2, _f_varint(1, d)) for d in arr.shape)
        entry = _f_varint(1, TF_DTYPE_CODES[arr.dtype]) + _f_bytes(2, shape)
        if raw:  # proto3 leaves zero-valued fields out
            entry += _f_varint(4, len(raw))
        entry += _f_varint(5, len(blob)) + _f_fixed32(6, mask_crc(crc32c(blob)))
        pairs.append((name.encode(), entry))
        raw += blob
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_table(Path(f"{prefix}.index"), pairs, **table_kwargs)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(raw))
    return prefix


# The authors' variable naming, written out independently of dfl.tf_import.mapping.
def _tf_conv(w: torch.Tensor) -> np.ndarray:  # torch [cout, cin, k] → TF [1, k, cin, cout]
    return w.detach().numpy().transpose(2, 1, 0)[None].copy()


def tf_variables_of_denoiser(net: ContextAggregationNet) -> dict[str, np.ndarray]:
    out = {}
    scopes = [f"se_conv_{i}" for i in range(len(net.convs) - 1)] + ["se_conv_last"]
    for scope, conv, norm in zip(scopes, net.convs, net.norms, strict=True):
        out[f"{scope}/weights"] = _tf_conv(conv.weight)
        out[f"{scope}/w0"] = np.float32(norm.alpha.item()).reshape(())
        out[f"{scope}/w1"] = np.float32(norm.beta.item()).reshape(())
        out[f"{scope}/BatchNorm/beta"] = norm.bn.bias.detach().numpy().copy()
    out["se_fc_last/weights"] = _tf_conv(net.output.weight)
    out["se_fc_last/biases"] = net.output.bias.detach().numpy().copy()
    return out


def tf_variables_of_lossnet(net: LossNetwork) -> dict[str, np.ndarray]:
    out = {}
    for i, (conv, norm) in enumerate(zip(net.convs, net.norms, strict=True)):
        out[f"loss_conv_{i}/weights"] = _tf_conv(conv.weight)
        out[f"loss_conv_{i}/BatchNorm/beta"] = norm.bias.detach().numpy().copy()
        out[f"loss_conv_{i}/BatchNorm/moving_mean"] = norm.running_mean.numpy().copy()
        out[f"loss_conv_{i}/BatchNorm/moving_variance"] = norm.running_var.numpy().copy()
    for name, scope in (("scene", "pred_conv_0"), ("tags", "pred_conv_1")):
        out[f"{scope}/weights"] = _tf_conv(net.heads[name].weight)
        out[f"{scope}/biases"] = net.heads[name].bias.detach().numpy().copy()
    return out


def _randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return net


@pytest.fixture(scope="module")
def fake_denoiser(tmp_path_factory):
    net = _randomised(ContextAggregationNet(**authors_config("denoiser")), seed=1)
    prefix = write_bundle(tmp_path_factory.mktemp("se") / "se_model.ckpt", tf_variables_of_denoiser(net))
    return net, prefix


@pytest.fixture(scope="module")
def fake_lossnet(tmp_path_factory):
    net = _randomised(LossNetwork(**authors_config("lossnet")), seed=2)
    variables = tf_variables_of_lossnet(net)
    variables["global_step"] = np.array(1234, dtype=np.int64)  # extra variables are ignored
    prefix = write_bundle(tmp_path_factory.mktemp("loss") / "loss_model.ckpt", variables)
    return net, prefix


# ---------------------------------------------------------------------------------------------
# Bundle reader.


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the Castagnoli polynomial's published check value
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


def test_reader_roundtrip_dtypes_shapes_and_prefix_compression(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "layer/weights": rng.standard_normal((1, 3, 2, 4)).astype(np.float32),
        "layer/w0": np.float32(0.25).reshape(()),
        "layer/BatchNorm/beta": rng.standard_normal(4).astype(np.float32),
        "layer/BatchNorm/moving_mean": rng.standard_normal(4),  # float64
        "layer_2/biases": np.arange(5, dtype=np.int32),
        "global_step": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    # 2 entries per data block and a restart every 2 entries: several blocks, shared key prefixes
    prefix = write_bundle(tmp_path / "m.ckpt", tensors, entries_per_block=2)
    ckpt = TFCheckpoint(prefix)
    assert ckpt.names() == sorted(tensors)
    assert ckpt.header["num_shards"] == 1
    for name, arr in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr)
    assert ckpt.shapes()["layer/weights"] == (1, 3, 2, 4)
    # any of the checkpoint's files names the same checkpoint
    assert TFCheckpoint(f"{prefix}.index").names() == ckpt.names()
    assert TFCheckpoint(f"{prefix}.data-00000-of-00001").names() == ckpt.names()
    with pytest.raises(KeyError, match="nope"):
        ckpt.read("nope")


def test_reader_hand_built_bytes(tmp_path):
    """One float tensor, every byte spelled out (no helper involved but the crc)."""
    value = struct.pack("<2f", 1.5, -2.0)
    shape = bytes([0x12, 0x02, 0x08, 0x02])  # TensorShapeProto{dim{size: 2}}
    entry = bytes([0x08, 0x01, 0x12, len(shape)]) + shape + bytes([0x28, 0x08])  # dtype FLOAT, size 8
    key = b"v"
    block = bytes([0, len(key), len(entry)]) + key + entry + struct.pack("<II", 0, 1)
    trailer = b"\0" + struct.pack("<I", mask_crc(crc32c(block + b"\0")))
    index = bytes([0, 1, 2]) + key + bytes([0, len(block)]) + struct.pack("<II", 0, 1)
    index_off = len(block) + 5
    itrailer = b"\0" + struct.pack("<I", mask_crc(crc32c(index + b"\0")))
    footer = (bytes([0, 0, index_off, len(index)])).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    (tmp_path / "h.ckpt.index").write_bytes(block + trailer + index + itrailer + footer)
    (tmp_path / "h.ckpt.data-00000-of-00001").write_bytes(value)
    np.testing.assert_array_equal(
        TFCheckpoint(tmp_path / "h.ckpt").read("v"), np.array([1.5, -2.0], np.float32)
    )


def test_reader_errors(tmp_path):
    prefix = write_bundle(
        tmp_path / "a" / "m.ckpt", {"x": np.ones(4, np.float32), "y": np.zeros(2, np.float32)}
    )
    index = Path(f"{prefix}.index")
    data = Path(f"{prefix}.data-00000-of-00001")

    with pytest.raises(FileNotFoundError, match=r"nothere\.ckpt\.index"):
        TFCheckpoint(tmp_path / "nothere.ckpt")

    data_bytes = data.read_bytes()
    data.unlink()
    with pytest.raises(FileNotFoundError, match=r"data-00000-of-00001"):
        TFCheckpoint(prefix)

    data.write_bytes(data_bytes[:-4])  # truncated
    with pytest.raises(CheckpointFormatError, match="truncated"):
        TFCheckpoint(prefix).read("y")

    flipped = bytearray(data_bytes)
    flipped[0] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFormatError, match="crc32c mismatch"):
        TFCheckpoint(prefix).read("x")
    np.testing.assert_array_equal(TFCheckpoint(prefix, verify=False).read("y"), np.zeros(2, np.float32))
    data.write_bytes(data_bytes)

    good = index.read_bytes()
    index.write_bytes(good[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="magic"):
        TFCheckpoint(prefix)
    index.write_bytes(b"short")
    with pytest.raises(CheckpointFormatError, match="too short"):
        TFCheckpoint(prefix)
    corrupt = bytearray(good)
    corrupt[3] ^= 0x01  # inside the first data block's contents
    index.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        TFCheckpoint(prefix)

    write_bundle(prefix, {"x": np.ones(4, np.float32)}, compression=1)
    with pytest.raises(CheckpointFormatError, match="snappy-compressed"):
        TFCheckpoint(prefix)


# ---------------------------------------------------------------------------------------------
# Variable mapping (independent of ../shared).


def test_authors_configs_build_the_authors_networks():
    den = ContextAggregationNet(**AUTHORS_DENOISER_CONFIG)
    assert den.dilations == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1]
    assert [c.out_channels for c in den.convs] == [64] * 14
    net = LossNetwork(**AUTHORS_LOSSNET_CONFIG)
    assert net.channels == [32] * 5 + [64] * 5 + [128] * 4
    assert net.strides == [2] * 13 + [1]
    assert {k: h.out_channels for k, h in net.heads.items()} == {"scene": 15, "tags": 7}
    cfg = authors_config("lossnet")
    cfg["heads"]["scene"] = 3  # a copy: the constants stay intact
    assert AUTHORS_LOSSNET_CONFIG["heads"]["scene"] == 15


def test_import_denoiser_maps_every_variable(fake_denoiser):
    net, prefix = fake_denoiser
    imported = import_denoiser(TFCheckpoint(prefix))
    ref = net.state_dict()
    for key, value in imported.state_dict().items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            # the authors' denoiser has no moving statistics: the buffers keep their initial values
            assert torch.equal(value, torch.zeros(64) if key.endswith("mean") else torch.ones(64)), key
        else:
            torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)
    # TF conv2d semantics on the first layer: out[t, co] = Σ_j x[t + j − 1] · W[0, j, 0, co] (SAME)
    w = tf_variables_of_denoiser(net)["se_conv_0/weights"]
    x = np.random.default_rng(0).standard_normal(20).astype(np.float32)
    xp = np.pad(x, 1)
    expected = np.stack([sum(xp[t + j] * w[0, j, 0] for j in range(3)) for t in range(20)], axis=1)
    got = imported.convs[0](torch.from_numpy(xp)[None, None])[0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_import_lossnet_maps_weights_heads_and_moving_statistics(fake_lossnet):
    net, prefix = fake_lossnet
    imported = import_lossnet(TFCheckpoint(prefix))
    ref = net.state_dict()
    state = imported.state_dict()
    assert any(k.endswith("running_mean") for k in state) and "heads.tags.bias" in state
    for key, value in state.items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)
    # the moving statistics serve a LossNetwork normalising with running statistics
    eval_net = LossNetwork(**{**AUTHORS_LOSSNET_CONFIG, "batch_stats_at_eval": False})
    eval_net.load_state_dict(state, strict=True)
    torch.testing.assert_close(eval_net.norms[3].running_var, net.norms[3].running_var)


def test_import_errors_name_the_problem(fake_denoiser, fake_lossnet, tmp_path):
    den, den_prefix = fake_denoiser
    _, loss_prefix = fake_lossnet
    with pytest.raises(TFImportError, match=r"holds a loss network.*dfl-import-tf lossnet"):
        import_denoiser(TFCheckpoint(loss_prefix))
    with pytest.raises(TFImportError, match=r"holds a denoiser.*dfl-import-tf denoiser"):
        import_lossnet(TFCheckpoint(den_prefix))

    variables = tf_variables_of_denoiser(den)
    bad = dict(variables)
    bad["se_conv_5/weights"] = bad["se_conv_5/weights"][:, :, :, :32]
    with pytest.raises(
        TFImportError, match=r"'se_conv_5/weights' has shape \[1, 3, 64, 32\], expected \[1, 3, 64, 64\]"
    ):
        import_denoiser(TFCheckpoint(write_bundle(tmp_path / "shape" / "m.ckpt", bad)))

    missing = {k: v for k, v in variables.items() if k not in ("se_conv_last/w1", "se_fc_last/biases")}
    with pytest.raises(TFImportError, match=r"missing variable\(s\) se_conv_last/w1, se_fc_last/biases"):
        import_denoiser(TFCheckpoint(write_bundle(tmp_path / "missing" / "m.ckpt", missing)))

    other = write_bundle(tmp_path / "other" / "m.ckpt", {"dense/kernel": np.ones((2, 2), np.float32)})
    with pytest.raises(TFImportError, match=r"no se_\* variables.*dense/kernel"):
        import_denoiser(TFCheckpoint(other))

    nan = dict(variables)
    nan["se_conv_2/w0"] = np.float32("nan").reshape(())
    with pytest.raises(TFImportError, match="se_conv_2/w0.*NaN"):
        import_denoiser(TFCheckpoint(write_bundle(tmp_path / "nan" / "m.ckpt", nan)))


def test_cli_writes_a_safe_loadable_dfl_model(fake_denoiser, fake_lossnet, tmp_path, capsys):
    den, den_prefix = fake_denoiser
    out = tmp_path / "out" / "se_model.pt"
    assert cli_main(["denoiser", str(den_prefix), "-o", str(out)]) == 0
    record = torch.load(out, map_location="cpu", weights_only=True)
    assert record["kind"] == "denoiser" and record["config"] == AUTHORS_DENOISER_CONFIG
    assert record["meta"]["source"] == "tensorflow"
    model = load_model(out, "denoiser")
    torch.testing.assert_close(model.convs[7].weight, den.convs[7].weight, rtol=0, atol=0)

    loss, loss_prefix = fake_lossnet
    out2 = tmp_path / "loss_model.pt"
    assert cli_main(["lossnet", f"{loss_prefix}.index", "-o", str(out2)]) == 0
    assert safe_load(out2)["config"] == AUTHORS_LOSSNET_CONFIG
    torch.testing.assert_close(load_model(out2, "lossnet").heads["scene"].bias, loss.heads["scene"].bias)

    bad_out = tmp_path / "bad.pt"
    assert cli_main(["lossnet", str(den_prefix), "-o", str(bad_out)]) == 1
    assert "holds a denoiser" in capsys.readouterr().err
    assert cli_main(["denoiser", str(tmp_path / "nope.ckpt"), "-o", str(bad_out)]) == 1
    assert "nope.ckpt.index: TF checkpoint index not found" in capsys.readouterr().err
    assert not bad_out.exists() and not list(tmp_path.glob(".bad.pt.*"))


# ---------------------------------------------------------------------------------------------
# Parity with the authors' TensorFlow graph (../shared).


def _need_shared(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(
                f"reference data not present ({p} is missing; it only exists beside the dev checkout)"
            )


def _read(path: Path) -> np.ndarray:
    wav, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000 and wav.ndim == 1
    return wav


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def authors_denoiser(tmp_path_factory):
    _need_shared(AUTHORS_TF / "se_model.ckpt.index", SAMPLES / "noisy")
    out = tmp_path_factory.mktemp("authors") / "se_model.pt"
    assert cli_main(["denoiser", str(AUTHORS_TF / "se_model.ckpt"), "-o", str(out)]) == 0
    return load_model(out, "denoiser").eval()


@pytest.fixture(scope="module")
def enhanced(authors_denoiser):
    names = sorted(p.name for p in (SAMPLES / "noisy").glob("*.wav"))
    assert names, "no noisy samples"
    out = {}
    with torch.no_grad():
        for name in names:
            noisy = _read(SAMPLES / "noisy" / name)
            out[name] = authors_denoiser(torch.from_numpy(noisy)[None])[0].numpy()  # whole file, batch of one
    return out


def test_denoiser_parity_with_authors_tf(enhanced):
    _need_shared(AUTHORS_TF / "enhanced")
    for name, ours in enhanced.items():
        ref = _read(AUTHORS_TF / "enhanced" / name).astype(np.float64)
        assert ours.shape == ref.shape, name
        snr = 10 * np.log10(np.sum(ref**2) / np.sum((ours - ref) ** 2))
        assert snr >= 40, f"{name}: error only {snr:.1f} dB below the authors' output"


def test_denoiser_pesq_matches_authors(enhanced):
    from pesq import pesq

    _need_shared(SAMPLES / "clean")
    # the authors' graph on these files (../shared/README.md): noisy → enhanced PESQ-wb
    authors = {"p287_001.wav": (1.762, 2.621), "p287_002.wav": (1.340, 2.284)}
    for name, (noisy_ref, enhanced_ref) in authors.items():
        clean = _read(SAMPLES / "clean" / name)
        noisy = _read(SAMPLES / "noisy" / name)
        assert pesq(16000, clean, noisy, "wb") == pytest.approx(noisy_ref, abs=0.005)
        ours = pesq(16000, clean, enhanced[name], "wb")
        assert ours == pytest.approx(enhanced_ref, abs=0.02), f"{name}: PESQ-wb {ours:.3f}"


@pytest.fixture(scope="module")
def authors_lossnet(tmp_path_factory):
    _need_shared(AUTHORS_TF / "random_loss_model.ckpt.index", AUTHORS_TF / "random_loss_model_golden.npz")
    out = tmp_path_factory.mktemp("authors_loss") / "loss.pt"
    assert cli_main(["lossnet", str(AUTHORS_TF / "random_loss_model.ckpt"), "-o", str(out)]) == 0
    return load_model(out, "lossnet").eval()  # eval: batch statistics all the same (batch_stats_at_eval)


def test_lossnet_parity_with_authors_tf(authors_lossnet):
    golden = np.load(AUTHORS_TF / "random_loss_model_golden.npz")
    clean = torch.from_numpy(_read(SAMPLES / "clean" / "p287_001.wav"))[None]
    noisy = torch.from_numpy(_read(SAMPLES / "noisy" / "p287_001.wav"))[None]
    with torch.no_grad():
        feats_clean = authors_lossnet(clean)
        # the golden feeds noisy and clean as two separate batches (two graph calls, as the
        # authors' featureloss() does), so each is normalised with its own BN statistics
        feats_noisy = authors_lossnet(noisy, n_layers=6)
        logits = authors_lossnet.classify(clean)
    assert len(feats_clean) == 14
    for i, f in enumerate(feats_clean):
        ref = golden[f"clean_features_{i}"]  # [time, channels]
        assert f.shape[1:] == ref.shape[::-1], i
        assert _rel(f[0].T.numpy(), ref) <= 1e-4, f"layer {i}"
    losses = np.array(
        [(a - b).abs().mean().item() for a, b in zip(feats_noisy, feats_clean[:6], strict=True)]
    )
    assert _rel(losses, golden["feature_loss_layers"]) <= 1e-4
    assert losses.sum() == pytest.approx(float(golden["feature_loss_total"]), rel=1e-4)
    assert _rel(logits["scene"][0].numpy(), golden["asc_logits"]) <= 1e-4
    assert _rel(logits["tags"][0].numpy(), golden["dat_logits"]) <= 1e-4


def test_lossnet_golden_is_not_a_joint_batch(authors_lossnet):
    """Documents how the golden was computed: one batch holding both signals gives other values."""
    golden = np.load(AUTHORS_TF / "random_loss_model_golden.npz")
    both = torch.from_numpy(np.stack([_read(SAMPLES / d / "p287_001.wav") for d in ("noisy", "clean")]))
    with torch.no_grad():
        feats = authors_lossnet(both, n_layers=6)
    joint = np.array([(f[0] - f[1]).abs().mean().item() for f in feats])
    assert _rel(joint, golden["feature_loss_layers"]) > 1e-3


def test_lossnet_moving_statistics_imported():
    _need_shared(AUTHORS_TF / "random_loss_model.ckpt.index")
    ckpt = TFCheckpoint(AUTHORS_TF / "random_loss_model.ckpt")
    net = import_lossnet(ckpt)
    for i in (0, 13):
        np.testing.assert_array_equal(
            net.norms[i].running_mean.numpy(), ckpt.read(f"loss_conv_{i}/BatchNorm/moving_mean")
        )
        np.testing.assert_array_equal(
            net.norms[i].running_var.numpy(), ckpt.read(f"loss_conv_{i}/BatchNorm/moving_variance")
        )
