import json
import subprocess
import sys

import pytest

from fastsd import cli


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastsd.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_help_lists_the_subcommands_without_importing_torch():
    code = ("import sys, fastsd, fastsd.cli; fastsd.cli.build_parser(); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
    res = run("--help")
    assert res.returncode == 0
    for command in ("session", "models", "env", "demo"):
        assert command in res.stdout


def every_parser(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from every_parser(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    for path, parser in every_parser(cli.build_parser()):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: fastsd"), path


def test_session_commands(workspace, capsys):
    assert cli.main(["session", "create", "my dog", "--class", "dog"]) == 0
    assert "my_dog" in capsys.readouterr().out
    assert cli.main(["session", "list"]) == 0
    assert capsys.readouterr().out.split() == ["my_dog"]
    assert cli.main(["session", "show", "my_dog"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["class_word"] == "dog" and shown["instance_images"] == 0
    assert cli.main(["session", "delete", "my_dog"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert (workspace / "sessions" / "my_dog").is_dir()
    assert cli.main(["session", "delete", "my_dog", "--yes"]) == 0
    assert not (workspace / "sessions" / "my_dog").exists()


def test_errors_are_one_clear_line_not_a_traceback(workspace):
    res = run("session", "create", "../escape", "--home", str(workspace))
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert ".." in res.stderr


def test_models_build_tiny(workspace, capsys):
    assert cli.main(["models", "build-tiny", "--family", "sd2"]) == 0
    assert (workspace / "models" / "tiny-sd2" / "model_index.json").is_file()
    assert "tiny-sd2" in capsys.readouterr().out


def test_env_reports_json(workspace, capsys):
    assert cli.main(["env"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["workspace"] == str(workspace)
