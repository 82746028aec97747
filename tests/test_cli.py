"""The argparse tools: every option is documented in --help, and outputs that exist are not replaced unasked."""

from __future__ import annotations

import argparse

import pytest
import torch

from dfl.checkpoints import load_model
from dfl.cli import bench, compare, denoise, export, import_tf, prepare
from tests.helpers.small_denoisers import saved_denoiser

PARSERS = {
    "dfl-bench": bench.build_parser,
    "dfl-compare": compare.build_parser,
    "dfl-denoise": denoise.build_parser,
    "dfl-export": export.build_parser,
    "dfl-import-tf": import_tf.build_parser,
    "dfl-prepare": prepare.build_parser,
}


def all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {label}", a) for label, a in all_actions(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_every_option_has_help(tool, capsys):
    parser = PARSERS[tool]()
    assert parser.prog == tool
    undocumented = [label for label, action in all_actions(parser) if not (action.help or "").strip()]
    assert undocumented == [], f"{tool}: options without help: {undocumented}"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    assert parser.description and parser.description in " ".join(capsys.readouterr().out.split())


def test_export_keeps_an_existing_output_unless_overwrite(tmp_path, capsys):
    ckpt = saved_denoiser(tmp_path / "model.pt")
    target = tmp_path / "model.ts"
    target.write_bytes(b"the user's file")
    args = [str(ckpt), "--format", "torchscript", "-o", str(target)]
    with pytest.raises(SystemExit) as exc:
        export.main(args)
    assert exc.value.code == 2
    assert f"--output {target} already exists; pass --overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"the user's file"
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    assert export.main([str(ckpt), "--format", "torchscript", "-o", str(blocked / "model.ts")]) == 1
    assert f"cannot write --output {blocked / 'model.ts'}" in capsys.readouterr().err
    assert export.main([*args, "--overwrite"]) == 0
    scripted = torch.jit.load(str(target))
    x = torch.randn(1, 800)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), load_model(ckpt, "denoiser").eval()(x), rtol=1e-4, atol=1e-5)


def test_import_tf_keeps_an_existing_output_unless_overwrite(tmp_path, capsys):
    target = tmp_path / "se_model.pt"
    target.write_bytes(b"the user's file")
    missing = str(tmp_path / "nope.ckpt")
    # refused before the (missing) checkpoint is even read: the output check comes first
    with pytest.raises(SystemExit) as exc:
        import_tf.main(["denoiser", missing, "-o", str(target)])
    assert exc.value.code == 2
    assert f"--output {target} already exists; pass --overwrite" in capsys.readouterr().err
    assert import_tf.main(["denoiser", missing, "-o", str(target), "--overwrite"]) == 1
    assert "TF checkpoint index not found" in capsys.readouterr().err
    assert target.read_bytes() == b"the user's file"  # a failed import leaves it as it was

    folder = tmp_path / "models"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exc:
            import_tf.main(["denoiser", missing, "-o", str(folder), *extra])
        assert exc.value.code == 2
        assert f"--output {folder} is a folder" in capsys.readouterr().err
