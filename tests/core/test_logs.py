"""Log lines: JSON objects when stderr is not a terminal, their context as top-level keys;
partition lists summarised into one line."""

from __future__ import annotations

import io
import json
import logging

import pytest
from durable.core import logs


@pytest.fixture
def restore_root() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_a_record_is_one_json_line_with_its_context(restore_root: object) -> None:
    stream = io.StringIO()  # not a terminal: auto means JSON
    logs.configure(logging.INFO, "auto", stream)
    log = logging.getLogger("durable.worker")
    log.info("acquired %d partition(s)", 3, extra={"worker": "w1", "partitions": logs.ranges([0, 1, 2]),
                                                   "epoch": 7, "object_id": "ab" * 32, "namespace": "Counter"})
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed", extra={"partition": 4})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "acquired 3 partition(s)" and first["level"] == "info"
    assert first["logger"] == "durable.worker" and first["ts"].endswith("Z")
    assert (first["worker"], first["partitions"], first["epoch"]) == ("w1", "0-2", 7)
    assert (first["object_id"], first["namespace"]) == ("ab" * 32, "Counter")
    assert second["level"] == "error" and second["partition"] == 4
    assert "ValueError: boom" in second["exc"]


def test_text_lines_for_a_terminal_carry_the_context_as_pairs(restore_root: object) -> None:
    stream = io.StringIO()
    logs.configure(logging.INFO, "text", stream)
    logging.getLogger("durable.worker").warning("stepping down", extra={"partition": 3, "epoch": 9})
    line = stream.getvalue().strip()
    assert "WARNING durable.worker: stepping down partition=3 epoch=9" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_auto_picks_text_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.use_json("auto", Tty()) is False
    assert logs.use_json("auto", io.StringIO()) is True
    assert logs.use_json("json", Tty()) is True
    assert logs.use_json("text", io.StringIO()) is False


def test_partition_lists_are_summarised_as_ranges() -> None:
    assert logs.ranges([]) == ""
    assert logs.ranges([5]) == "5"
    assert logs.ranges([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10"
    assert logs.ranges({2: 1, 1: 1}) == "1-2"
