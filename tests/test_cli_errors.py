"""Expected errors print one line; Prefect's console records about them are filtered."""

from __future__ import annotations

import logging
import sys

from flows.cli import ExpectedErrorFilter
from pipeline.data import DataError


def record(name: str, message: str, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if error is not None:
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, exc_info)


def test_records_about_expected_errors_are_dropped_and_others_kept():
    quiet = ExpectedErrorFilter((DataError,))
    bad_input = DataError("data file x.csv does not exist")
    # Prefect's three records about the failed task and flow run: with the exception, and
    # the final states that only name it.
    assert not quiet.filter(record("prefect.task_runs", "Task run failed", bad_input))
    assert not quiet.filter(
        record("prefect.task_runs", "Finished in state Failed('... DataError: data file')")
    )
    assert not quiet.filter(
        record("prefect.flow_runs", "Encountered exception: DataError('data file')")
    )
    # A bug keeps its traceback; other loggers and other messages pass.
    assert quiet.filter(record("prefect.flow_runs", "Encountered exception", KeyError("x")))
    assert quiet.filter(record("prefect.flow_runs", "Finished in state Failed('KeyError: x')"))
    assert quiet.filter(record("prefect.flow_runs", "Beginning flow run 'a' for flow 'retrain'"))
    assert quiet.filter(record("pipeline.data", "DataError: elsewhere", bad_input))
