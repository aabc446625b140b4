"""The command line itself: fast help, one-line errors that name options, results on stdout, clean exits."""

import logging
import subprocess
import sys

import pytest

from cryo_forum import cli
from cryo_forum.commands.options import option_name
from cryo_forum.errors import CryoForumError, InvalidSetting


def test_help_and_option_errors_import_nothing_heavy():
    """--help must answer at once: building a command's parser may not import TensorFlow, pandas or scipy."""
    script = (
        "import sys; from cryo_forum import cli\n"
        "for command in [None, *cli.COMMANDS]:\n"
        "    cli.build_parser(command)\n"
        "heavy = sorted(m for m in ('tensorflow', 'pandas', 'scipy', 'keras') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_option_help_is_written_out(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "default: None" not in text
    parser = cli.build_parser(command)
    sub = next(action for action in parser._actions if action.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"


def test_setting_errors_name_the_option_of_the_command():
    options = {"--coarse", "--max-shift", "--image-size"}
    assert option_name("coarse_deg", options) == "--coarse"
    assert option_name("max_shift_px", options) == "--max-shift"
    assert option_name("image_size", options) == "--image-size"
    assert option_name("image_size", {"--out"}) is None
    line = cli._error_line("predict", InvalidSetting("image_size", "must be at most 32 px"), {"--out"})
    assert line == "cryo-forum predict: error: image_size: must be at most 32 px"
    line = cli._error_line("train", InvalidSetting("image_size", "must be at most 32 px"), options)
    assert line == "cryo-forum train: error: --image-size: must be at most 32 px"


def test_file_errors_of_the_system_are_one_line(monkeypatch, capsys):
    from cryo_forum.commands import info

    def fails(args):
        raise PermissionError(13, "Permission denied", "/data/particles.star")

    monkeypatch.setattr(info, "main", fails)
    assert cli.main(["info", "x.star"]) == 1
    assert capsys.readouterr().err == "cryo-forum info: error: /data/particles.star: Permission denied\n"


def test_library_errors_are_one_line(monkeypatch, capsys):
    from cryo_forum.commands import info

    def fails(args):
        raise CryoForumError("x.star: no particle table")

    monkeypatch.setattr(info, "main", fails)
    assert cli.main(["info", "x.star"]) == 1
    assert capsys.readouterr().err == "cryo-forum info: error: x.star: no particle table\n"


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    from cryo_forum.io.maps import example_map_path

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["simulate", "--volume", str(example_map_path()), "--n", "4", "--box-size", "32"]
    assert cli.main([*argv, "--out", str(blocker / "sim")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main([*argv, "--out", "/sys/sim"]) == 1  # not writable, even for root
    assert "cannot write in /sys" in capsys.readouterr().err


def test_progress_in_a_log_file_is_plain_lines(capsys):
    from cryo_forum.progress import progress

    handler = cli._StderrHandler()
    logger = logging.getLogger("cryo_forum")
    logger.addHandler(handler)
    logger.setLevel("INFO")
    try:
        with progress(1000, description="predict", interval=0.0) as bar:
            for _ in range(100):
                bar.update(10)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, like a log file
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == 10
    assert lines[0].startswith("predict: 100 / 1000 particles (10 %") and "1000 / 1000" in lines[-1]
