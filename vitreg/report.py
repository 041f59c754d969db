"""The batch report: one HTML page to look at every registration of a study.

``register-batch --report`` writes ``report.html`` into its output folder: the counts, the
failed rows with their errors, then one section per registered pair, flagged pairs first
('fail', then 'check', then 'ok'), each with its QC flag and reasons, its indicators and its
QC figure. The page needs no server, script or network: the style is inline and the figures
are the ``NAME_qc.png`` files beside it, linked by relative paths (``loading="lazy"``), so the
page stays small for hundreds of pairs (each figure is about 250 KB; embedded as base64 they
would make a 300-pair page about 100 MB) and opens wherever the folder is copied.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from pathlib import Path

from vitreg.files import write_text

REPORT_NAME = "report.html"
FLAG_ORDER = {"fail": 0, "check": 1, "ok": 2}
INDICATORS = (
    ("NCC in the head, before → after", ("head_ncc_before", "head_ncc_after"), 3),
    ("% det J ≤ 0", ("percent_nonpositive",), 4),
    ("det J 1st / 99th percentile", ("jacobian_p1", "jacobian_p99"), 2),
    ("affine scales", ("affine_scales",), 3),
    ("affine shear", ("affine_shear",), 3),
    ("moving head outside the fixed field of view", ("moving_outside_fov",), 3),
    ("fixed head not covered by the moving image", ("fixed_uncovered",), 3),
    ("mirrored moving image fits better by", ("mirror_advantage",), 3),
    ("fixed-warped intensity correlation in the head", ("head_correlation",), 3),
    ("Dice before → after", ("dice_before", "dice_after"), 3),
    ("SDlogJ", ("sdlogj",), 3),
    ("seconds", ("seconds",), 1),
)
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.flag { font-weight: bold; padding: 0.1em 0.5em; border-radius: 0.3em; color: white; }
.flag-ok { background: #2a7a2a; } .flag-check { background: #c48a00; }
.flag-fail, .flag-failed { background: #b22222; }
section.pair { border-top: 2px solid #888; margin-top: 1.5em; padding-top: 0.5em; }
img { max-width: 100%; }
"""


def _number(value: object, digits: int) -> str:
    if isinstance(value, list):
        return ", ".join(_number(item, digits) for item in value)
    if isinstance(value, bool) or value is None or value == "":
        return "-" if value in (None, "") else str(value)
    return f"{float(value):.{digits}f}"


def _badge(flag: str) -> str:
    return f'<span class="flag flag-{html.escape(flag)}">{html.escape(flag)}</span>'


def _anchor(record: dict) -> str:
    return "pair-" + html.escape(str(record["name"]), quote=True)


def ordered(records: Sequence[dict]) -> list[dict]:
    """The registered records, flagged first: 'fail', 'check', then 'ok', each in CSV order."""
    registered = [record for record in records if record.get("status") == "ok"]
    return sorted(registered, key=lambda r: (FLAG_ORDER.get(r.get("qc_flag"), 3), r["row"]))


def _pair_section(record: dict, folder: Path) -> str:
    """One pair: name and flag, reasons, indicators and its QC figure (relative link)."""
    flag = str(record.get("qc_flag") or "")
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in record.get("qc_reasons", []))
    rows = []
    for title, keys, digits in INDICATORS:
        values = [record.get(key) for key in keys]
        if all(value in (None, "") for value in values):
            continue
        cells = " → ".join(_number(value, digits) for value in values)
        rows.append(f"<tr><th>{html.escape(title)}</th><td>{cells}</td></tr>")
    figure = Path(record.get("qc") or "")
    if record.get("qc") and (folder / figure.name).is_file():
        image = (
            f'<img src="{html.escape(figure.name, quote=True)}" loading="lazy" '
            f'alt="QC figure of {html.escape(str(record["name"]), quote=True)}">'
        )
    else:
        image = "<p>No QC figure.</p>"
    return (
        f'<section class="pair" id="{_anchor(record)}" data-flag="{html.escape(flag)}">\n'
        f"<h2>{html.escape(str(record['name']))} {_badge(flag)}</h2>\n"
        f"<p>{html.escape(str(record.get('moving', '')))} → "
        f"{html.escape(str(record.get('fixed', '')))} (CSV line {record['row']})</p>\n"
        + (f"<ul>{reasons}</ul>\n" if reasons else "")
        + f"<table>{''.join(rows)}</table>\n{image}\n</section>\n"
    )


def report_html(records: Sequence[dict], csv_path: Path, folder: Path) -> str:
    """The report page for the batch ``records`` (summary.json's) of ``csv_path``, whose
    outputs lie in ``folder``."""
    pairs = ordered(records)
    failed = [record for record in records if record.get("status") == "failed"]
    counts = {flag: sum(r.get("qc_flag") == flag for r in pairs) for flag in FLAG_ORDER}
    overview = "".join(
        f'<tr><td><a href="#{_anchor(r)}">{html.escape(str(r["name"]))}</a></td>'
        f"<td>{_badge(str(r.get('qc_flag') or ''))}</td>"
        f"<td>{_number(r.get('head_ncc_after'), 3)}</td>"
        f"<td>{_number(r.get('percent_nonpositive'), 4)}</td>"
        f"<td>{html.escape('; '.join(r.get('qc_reasons', [])))}</td></tr>"
        for r in pairs
    )
    failures = "".join(
        f'<tr class="failed" data-name="{html.escape(str(r["name"]), quote=True)}">'
        f"<td>{r['row']}</td><td>{html.escape(str(r['name']))}</td><td>{_badge('failed')}</td>"
        f"<td>{html.escape(str(r.get('error', '')))}</td></tr>"
        for r in failed
    )
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = ", ".join(f"{counts[flag]} {flag}" for flag in FLAG_ORDER)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vitreg report: {html.escape(csv_path.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>vitreg register-batch: {html.escape(str(csv_path))}</h1>",
        f"<p>{len(records)} pairs: {summary}, {len(failed)} failed. Written {when}.</p>",
        "<h2>Pairs, flagged first</h2>",
        "<table><tr><th>pair</th><th>QC</th><th>NCC after</th><th>% det J ≤ 0</th>"
        f"<th>reasons</th></tr>{overview}</table>",
    ]
    if failed:
        parts += [
            "<h2>Failed rows</h2>",
            "<table><tr><th>CSV line</th><th>pair</th><th>status</th><th>error</th></tr>"
            f"{failures}</table>",
        ]
    parts += [_pair_section(record, folder) for record in pairs]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(records: Sequence[dict], csv_path: Path, folder: Path) -> Path:
    """Write ``folder/report.html`` (atomically) for the batch ``records``; returns its path."""
    return write_text(folder / REPORT_NAME, report_html(records, csv_path, folder))
