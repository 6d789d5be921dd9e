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


def test_the_readme_walkthrough_trains_sd15_never_the_test_model(workspace, capsys, tmp_path):
    """`fastsd session create my_dog --class dog`, then photos, then `fastsd train my_dog`:
    the registry's SD 1.5, whose download (offline here) is the one error. A session made
    without a base model is refused with the command that names one."""
    from fastsd import session
    from fastsd.dataset import samples
    from fastsd.models import registry

    assert cli.main(["session", "create", "my_dog", "--class", "dog"]) == 0
    assert "(base model sd15)" in capsys.readouterr().out
    assert session.load("my_dog", workspace).base_model == registry.DEFAULT_BASE_MODEL == "sd15"
    photos = samples.write(tmp_path / "photos", ["chelsea"])
    assert cli.main(["images", "import", "my_dog", str(photos[0].parent)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "my_dog", "--unet-steps", "1", "--text-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert registry.get("sd15").repo in err, err
    assert not (workspace / "models" / "tiny-sd1").exists()

    session.create("bare", workspace)
    assert cli.main(["train", "bare"]) == 2
    assert "Session bare has no base model yet. Choose one: run 'fastsd session set bare " \
        "--model MODEL'." in capsys.readouterr().err
    assert cli.main(["session", "set", "bare", "--model", "sd21"]) == 0
    assert "changed base_model: None -> 'sd21'" in capsys.readouterr().out
    assert session.load("bare", workspace).base_model == "sd21"
    assert cli.main(["session", "set", "nobody", "--model", "sd21"]) == 2
    assert not (workspace / "sessions" / "nobody").exists()
