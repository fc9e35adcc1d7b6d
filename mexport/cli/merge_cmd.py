"""`mexport merge-reports`: one parity report from the partial reports of shard runs (CI matrix, Slurm, k8s)."""

from __future__ import annotations

from pathlib import Path

import typer

from mexport.cli import app, json_option
from mexport.cli.validate_cmd import show_report
from mexport.validate.verdict import FAIL_ON_HELP


@app.command("merge-reports")
def merge_reports_command(
    parts: list[Path] = typer.Argument(..., help="Partial reports (partial.json, or the directories holding them)."),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory (report.json/.md, junit.xml, png)."),
    fail_on: str | None = typer.Option(None, "--fail-on", help=FAIL_ON_HELP + " Default: the shards' policy."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace report files in OUT that mexport did not write (others are kept)."
    ),
    as_json: bool = json_option(),
) -> None:
    """Merge shard runs (`validate --shard K/N`) into one report, every statistic recomputed over the union.

    Refuses (exit 2) parts of other references, settings or questions, and an incomplete or overlapping shard set;
    parts of other candidates (e.g. one engine per target GPU) become rows of the same report. Exit codes as
    `mexport validate`.
    """
    from mexport.validate import merge_reports

    show_report(merge_reports(parts, output=output, fail_on=fail_on, overwrite=overwrite), output, as_json)
