"""The test suite's own set-up: the toy world's cache key and the order in which the two workers get files."""

from __future__ import annotations

from pathlib import Path

import conftest
import toy_world_cache

REPO = Path(__file__).resolve().parents[2]


def test_the_world_key_covers_what_the_builder_imports():
    sources = {p.relative_to(REPO).as_posix() for p in toy_world_cache.toy_sources()}
    # The builder, the trainers it starts, and modules reached only through their imports.
    assert {"mnpo/toy/world.py", "mnpo/supervised/reward_model.py", "mnpo/judges/toy_oracle.py"} <= sources
    assert "mnpo/__init__.py" in sources
    # Not what the world does not depend on: the pipeline and the online trainer.
    assert not any(s.startswith(("mnpo/pipeline/", "mnpo/online/")) for s in sources)
    assert toy_world_cache.toy_world_path().name == f"toy-world-{toy_world_cache.toy_world_key()}"


def test_files_named_for_scheduling_exist():
    # A renamed file would silently lose its place at the front of the queue.
    for path in (*conftest._LONG_FIRST, *conftest._ONE_UNIT_PER_TEST):
        assert (REPO / path).is_file(), path


def test_a_file_is_one_unit_of_work_except_the_end_to_end_runs():
    a = "tests/integration/test_pipeline.py::test_rerun_skips_every_stage"
    b = "tests/integration/test_pipeline.py::test_plan_wires_history_for_every_mode"
    assert conftest.work_unit(a) == conftest.work_unit(b) == "tests/integration/test_pipeline.py"
    td = "tests/integration/test_end_to_end.py::test_run_sh_three_iterations_beat_the_reference[td-mnpo]"
    egpo = "tests/integration/test_end_to_end.py::test_run_sh_three_iterations_beat_the_reference[egpo]"
    assert conftest.work_unit(td) != conftest.work_unit(egpo)
