"""lab.py's own errors: one sentence, named once, exit code 2."""

from __future__ import annotations

from labkit import cli


def test_a_bad_argument_is_one_line_naming_the_program_once(capsys):
    assert cli.main(["run", "--bogus"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "lab.py: unrecognized arguments: --bogus"


def test_an_error_of_a_command_is_prefixed_with_the_program(capsys, tmp_path):
    assert cli.main(["check", str(tmp_path / "missing.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lab.py: ") and not line.startswith("lab.py: lab.py") and "missing.yaml" in line
