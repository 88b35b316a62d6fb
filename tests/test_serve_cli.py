"""`phiclip serve` options (parsing only; the server itself is tested in test_serve_api)."""

from __future__ import annotations

import argparse

from serve.cli import add_subparser, config_from_args, run


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="phiclip")
    add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_bind_loopback_only():
    args = parse("runs/demo")
    config = config_from_args(args)
    assert args.func is run
    assert (config.host, config.port, config.concurrency, config.ui) == ("127.0.0.1", 7860, 1, True)
    assert config.whisper_model == "bundled" and config.language == "en"
    assert config.limits.max_upload_bytes == 20 * 1024 * 1024


def test_options():
    args = parse(
        "r",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--concurrency",
        "3",
        "--whisper-model",
        "none",
        "--max-upload-mb",
        "1.5",
        "--language",
        "de",
        "--no-ui",
        "--max-queue",
        "5",
    )
    config = config_from_args(args)
    assert (config.host, config.port, config.concurrency, config.max_queue) == ("0.0.0.0", 9000, 3, 5)
    assert config.whisper_model is None and config.language == "de" and not config.ui
    assert config.limits.max_upload_bytes == int(1.5 * 1024 * 1024)


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    assert run(parse(str(tmp_path))) == 2
    assert "neither a PhiClip folder" in capsys.readouterr().err


def test_every_option_is_a_serve_config_field_with_its_help():
    """The command line is derived from ServeConfig: each option maps to a field, each help is the field's."""
    from dataclasses import fields

    from serve.config import ServeConfig, cli_fields

    parser = argparse.ArgumentParser(prog="phiclip")
    add_subparser(parser.add_subparsers(dest="command"))
    serve = parser._subparsers._group_actions[0].choices["serve"]
    options = {a.dest: a for a in serve._actions if a.option_strings and a.dest != "help"}
    assert set(options) == {f.name for f in cli_fields()}
    assert set(options) <= {f.name for f in fields(ServeConfig)}
    for f in cli_fields():
        assert options[f.name].help == f.metadata["help"]
        assert options[f.name].default == f.default


def test_out_of_bounds_options_are_refused_by_name():
    import pytest

    for argv, name in ((["--max-batch", "0"], "--max-batch"), (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
                       (["--max-upload-mb", "0"], "--max-upload-mb")):
        with pytest.raises(ValueError, match=name):
            config_from_args(parse("r", *argv))
