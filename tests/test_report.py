"""The register-batch report, opened with a real HTML parser: every pair with its flag,
flagged pairs first, the failed rows, and figures that load without a server or network."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.volumes import grid_affine, world_head, write
from vitreg.cli import app

runner = CliRunner()
SHAPE = (30, 32, 28)


class ReportParser(HTMLParser):
    """Collects the pair sections (id, data-flag, the badge text inside), the failed rows,
    every src/href and whether a script tag appears."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.failed: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._badge: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section" and "pair" in (values.get("class") or ""):
            self.sections.append({"id": values["id"], "flag": values.get("data-flag")})
        if tag == "span" and "flag" in (values.get("class") or "").split() and self.sections:
            self._badge = self.sections[-1]
        if tag == "tr" and values.get("class") == "failed":
            self.failed.append(values["data-name"])
        for key in ("src", "href"):
            if values.get(key):
                self.links.append(values[key])
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        if self._badge is not None and data.strip():
            self._badge.setdefault("badge", data.strip())
            self._badge = None


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, tiny_checkpoint):
    """A batch of a normal pair, the same pair with its moving image cut to the upper half
    of the head (flagged), and a row whose moving file does not exist (failed)."""
    folder = tmp_path_factory.mktemp("report")
    affine = grid_affine(np.diag([2.0] * 3), SHAPE)
    write(folder / "fixed.nii.gz", world_head(affine, SHAPE), affine)
    moving = world_head(affine, SHAPE, shift_mm=(2, -1, 1), wave_mm=1.5)
    write(folder / "moving.nii.gz", moving, affine)
    half = affine.copy()
    half[:3, 3] += affine[:3, :3] @ [0, 0, SHAPE[2] // 2]
    write(folder / "cut.nii.gz", moving[:, :, SHAPE[2] // 2 :], half)
    with open(folder / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerows([["name", "fixed", "moving"], ["normal", "fixed.nii.gz", "moving.nii.gz"],
                          ["cut", "fixed.nii.gz", "cut.nii.gz"],
                          ["lost", "fixed.nii.gz", "missing.nii.gz"]])  # fmt: skip
    args = [
        "register-batch", folder / "pairs.csv", "--out-dir", folder / "out",
        "--weights", tiny_checkpoint, "--iterations", "20,10", "--levels", "2,1", "--report",
    ]  # fmt: skip
    result = runner.invoke(app, [str(arg) for arg in args])
    return folder / "out", result


def test_report_shows_every_pair_with_its_flag_flagged_first(batch_run):
    out, result = batch_run
    assert result.exit_code == 1, result.output  # the missing file fails its row
    assert "QC: 1 of 2 registered pairs flagged" in " ".join(result.output.split())
    records = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["pairs"]}
    assert records["normal"]["qc_flag"] == "ok" and records["cut"]["qc_flag"] in ("check", "fail")
    parser = ReportParser()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    shown = {section["id"]: section for section in parser.sections}
    assert set(shown) == {"pair-normal", "pair-cut"}
    for name in ("normal", "cut"):
        flag = records[name]["qc_flag"]
        assert shown[f"pair-{name}"]["flag"] == flag == shown[f"pair-{name}"]["badge"]
    assert [section["id"] for section in parser.sections] == ["pair-cut", "pair-normal"]
    assert parser.failed == ["lost"]


def test_report_needs_no_server_nor_network(batch_run):
    out, _ = batch_run
    parser = ReportParser()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert parser.scripts == 0
    images = [link for link in parser.links if link.endswith(".png")]
    assert sorted(images) == ["cut_qc.png", "normal_qc.png"]
    for link in parser.links:
        assert link.startswith("#") or (out / link).is_file(), link
        assert "://" not in link and not Path(link).is_absolute()
