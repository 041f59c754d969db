"""The shared terminal helpers: one-line user errors with exit code 2, the download bar."""

from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from vitreg.console import USER_ERROR_EXIT_CODE, download_progress, user_errors
from vitreg.errors import VitregError


def test_a_user_error_is_one_stderr_line_and_exit_code_2(capsys):
    with pytest.raises(typer.Exit) as stopped, user_errors():
        raise VitregError("scan.nii.gz: the image\n   is   constant")
    assert stopped.value.exit_code == USER_ERROR_EXIT_CODE == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["vitreg: error: scan.nii.gz: the image is constant"]


def test_a_user_error_is_printed_literally_without_markup_or_emoji_codes(capsys):
    with pytest.raises(typer.Exit), user_errors():
        raise VitregError("runs/[bold]/a:x:b.csv: no such file; local:two: bad")
    line = "vitreg: error: runs/[bold]/a:x:b.csv: no such file; local:two: bad"
    assert capsys.readouterr().err.splitlines() == [line]


def test_other_errors_pass_through_untouched(capsys):
    with pytest.raises(ZeroDivisionError), user_errors():
        _ = 1 / 0
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_one_stderr_line_and_exit_code_130(capsys):
    with pytest.raises(typer.Exit) as stopped, user_errors("the summary is kept"):
        raise KeyboardInterrupt
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.splitlines() == ["vitreg: interrupted; the summary is kept"]


def test_sigterm_turned_into_a_library_error_is_reported_as_the_interruption(capsys):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(typer.Exit) as stopped, user_errors():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once
        except KeyboardInterrupt:  # as a library may do with an exception in its callback
            raise ValueError("could not determine the shape of object type") from None
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.splitlines() == ["vitreg: interrupted"]
    assert signal.getsignal(signal.SIGTERM) == handler  # given back


def test_download_progress_takes_the_reported_bytes_and_is_silent_when_quiet(capsys):
    with download_progress(quiet=True) as report:
        report(512, 2048)
        report(1024, 0)  # a server that sends no length: the total stays unknown
    assert capsys.readouterr().err == ""
