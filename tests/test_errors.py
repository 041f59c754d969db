"""Errors name the library's parameters; the command line shows the same errors as flags."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitreg.cli import app
from vitreg.console import flag_spelling
from vitreg.errors import OptionError, VitregError
from vitreg.register import RegisterSettings

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LINE_MODULES = {"cli.py", "cli_train.py", "cli_weights.py", "console.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def test_a_bad_value_reads_as_a_parameter_in_python_and_as_a_flag_on_the_command_line():
    with pytest.raises(OptionError) as caught:
        RegisterSettings(optimize=-1)
    assert str(caught.value) == "optimize=-1: must be >= 0"
    assert caught.value.render(flag_spelling) == "--optimize -1: must be >= 0"
    levels = OptionError("levels", (4, 0), "expected factors >= 1")
    assert str(levels) == "levels=(4, 0): expected factors >= 1"
    assert levels.render(flag_spelling) == "--levels 4,0: expected factors >= 1"


def test_parameters_named_inside_a_message_are_spelled_for_each_reader():
    error = VitregError("a.nii: failed; use {affine=False}, or {allow_affine_failure=True}")
    assert str(error) == "a.nii: failed; use affine=False, or allow_affine_failure=True"
    assert error.render(flag_spelling) == (
        "a.nii: failed; use --no-affine, or --allow-affine-failure"
    )
    combined = OptionError("dice_weight", 1.0, "needs {labels} (fixed, moving)")
    assert str(combined) == "dice_weight=1.0: needs labels (fixed, moving)"
    assert combined.render(flag_spelling) == (
        "--dice-weight 1.0: needs --fixed-labels and --moving-labels (fixed, moving)"
    )


def test_the_command_line_reports_its_flags(tmp_path):
    runner = CliRunner()
    base = ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz")]
    base += ["-o", str(tmp_path / "w.nii.gz"), "--weights", "none"]
    cases = [
        (["--optimize", "-1"], "vitreg: error: --optimize -1: must be >= 0"),
        (["--optimizer", "adam", "--dice-weight", "1"], "--dice-weight 1.0: needs --fixed-labels"),
        (["--levels", "4,x"], "--levels 4,x: expected integers separated by ',' or 'x'"),
        (["--similarity", "mi"], "--similarity mi: applies to the other optimiser"),
        (["--sigma-field-full", "-1"], "vitreg: error: --sigma-field-full -1.0: must be >= 0"),
        (
            ["--optimizer", "adam", "--sigma-field-full", "0.3"],
            "--sigma-field-full 0.3: applies to the other optimiser",
        ),
        (["--no-affine", "--affine-out", "a.mat"], "--affine-out a.mat: needs --affine"),
    ]
    for extra, expected in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and expected in result.output, (extra, result.output)


def test_no_library_error_names_a_command_line_flag():
    """Every string raised below the command line names parameters, never '--flags'."""
    found = []
    for path in sorted((ROOT / "vitreg").rglob("*.py")):
        if path.name in COMMAND_LINE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    if FLAG.search(part.value):
                        found.append(f"{path.name}:{node.lineno}: {part.value!r}")
    assert found == []


def test_option_errors_survive_pickling_as_a_cluster_worker_sends_them():
    error = OptionError("levels", (8, 4), "too coarse for {window}")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is OptionError and str(copy) == str(error)
    assert (copy.option, copy.value, copy.problem) == ("levels", (8, 4), "too coarse for {window}")
