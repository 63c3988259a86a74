"""Overlapping runs for real: both jobs launched at the same moment and a scheduled tick fired
by a real `dagster-daemon` while they run, all on one instance and one source: three runs at once.
Every run must succeed (waiting its turn per table; the manual runs are made to contend for
Notebook1's table, and a run must be seen waiting), no table may ever have two writers at once,
the outputs must meet the contract with no duplicate key, and, the source being unchanged, only
the first MERGE per table may change rows: the later ones commit zero-change MERGEs and
`_updated_at` does not move.

The manual runs hold at Notebook1 until the tick has created its run, so the tick always lands
among them. The scenario lives in `helpers.overlapping_runs_scenario`, so other instance storages
can run it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nbpipeline_tests.helpers import overlapping_runs_scenario

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]


def test_both_jobs_and_a_scheduled_tick_overlap_safely(
    spark, schema, instance, tmp_path: Path
) -> None:
    figures = overlapping_runs_scenario(spark, schema, instance, tmp_path)
    print(
        f"\nboth jobs + 1 scheduled tick: manual runs "
        f"{figures['manual_wall_s']}s wall, {figures['pool_waits']} pool waits; "
        f"tick at {figures['tick']}"
    )
