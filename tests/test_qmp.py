"""The QMP client's sans-IO half with hostile input: bytes in, messages or errors out.

Each case feeds what a broken or hostile QMP peer could send (QEMU's
``docs/interop/qmp-spec.rst``: one JSON object per line, UTF-8, the greeting
first, replies carrying the command's ``id``, events at any time) and checks
the error names what was expected and what was found. The control case first:
a real QEMU conversation (greeting, events around a reply, CRLF line ends)
parses, fed in one piece or byte by byte.
"""

from __future__ import annotations

import json

import pytest

from addcow.errors import AddCowError
from addcow.serve.qmp import (
    MAX_MESSAGE,
    QMPError,
    QMPParser,
    QMPProtocolError,
    check_greeting,
    flag,
    members,
    reply_value,
    text,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""},'
    b' "capabilities": ["oob"]}}\r\n'
)
EVENT = (
    b'{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "BLOCK_JOB_READY",'
    b' "data": {"device": "job0"}}\r\n'
)
REPLY = b'{"return": [{"device": "virtio0", "inserted": {"node-name": "fmt"}}], "id": 2}\r\n'


def feed_all(data: bytes) -> list[dict[str, object]]:
    return QMPParser().feed(data)


def test_control_a_conversation_parses_whole_or_byte_by_byte() -> None:
    stream = GREETING + EVENT + REPLY + EVENT
    whole = feed_all(stream)
    parser = QMPParser()
    one_by_one = [m for i in range(len(stream)) for m in parser.feed(stream[i : i + 1])]
    assert whole == one_by_one
    assert [("event" in m, "return" in m) for m in whole] == [
        (False, False),
        (True, False),
        (False, True),
        (True, False),
    ]
    assert check_greeting(whole[0])["version"]["qemu"]["major"] == 8
    value = reply_value("query-block", 2, whole[2])
    assert text(members(value, "query-block")[0], "device", "query-block") == "virtio0"
    assert flag({}, "ro", "node") is False
    assert QMPParser().feed(b"\r\n  \n") == []  # blank lines are skipped


def test_events_interleaved_are_not_replies() -> None:
    """An event between a command and its reply is a message of its own; taken for
    the reply it is refused (it carries no ``id``), and the reply after it parses."""
    messages = feed_all(EVENT + REPLY)
    with pytest.raises(QMPProtocolError) as err:
        reply_value("query-block", 2, messages[0])
    assert str(err.value) == "QMP reply to query-block: expected id 2, found null"
    assert reply_value("query-block", 2, messages[1])[0]["device"] == "virtio0"


def test_a_message_split_across_feeds_waits_for_its_line_end() -> None:
    parser = QMPParser()
    assert parser.feed(REPLY[:10]) == []
    assert parser.feed(REPLY[10:-2]) == []
    assert parser.feed(b"\r\n") == [json.loads(REPLY)]


def test_oversized_line_without_an_end() -> None:
    parser = QMPParser()
    parser.feed(b"[" * MAX_MESSAGE)  # at the limit: still waiting
    with pytest.raises(QMPProtocolError) as err:
        parser.feed(b"[")
    assert str(err.value) == (
        f"QMP message: expected at most {MAX_MESSAGE} bytes, "
        f"found {MAX_MESSAGE + 1} without a line end"
    )


def test_oversized_line_with_its_end() -> None:
    line = b'{"return": "' + b"x" * MAX_MESSAGE + b'", "id": 1}\n'
    with pytest.raises(QMPProtocolError) as err:
        feed_all(line)
    assert str(err.value) == (
        f"QMP message: expected at most {MAX_MESSAGE} bytes, found {len(line) - 1}"
    )


@pytest.mark.parametrize(
    ("line", "found"),
    [
        (b"[1, 2]", "list"),
        (b'"QMP"', "str"),
        (b"42", "int"),
        (b"null", "NoneType"),
    ],
)
def test_json_that_is_not_an_object(line: bytes, found: str) -> None:
    with pytest.raises(QMPProtocolError) as err:
        feed_all(line + b"\n")
    assert str(err.value) == f"QMP message: expected an object, found {found}"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"return": {}, "id": 1', "Expecting ',' delimiter"),
        (b"{'return': {}}", "Expecting property name"),
        (b'{"return": NaN, "id": 1}', "NaN is not a JSON number"),
        (b'{"return": 1e999, "id": 1}', "1e999 is beyond the range of a number"),
        (b'{"return": ' + b"[" * 100000 + b"]" * 100000 + b"}", "recursion"),
        # JSON in UTF-16 or UTF-32 (json.loads would guess these from bytes)
        ('{"return": {}, "id": 1}'.encode("utf-16-le"), "Expecting property name"),
        ('{"return": {}, "id": 1}'.encode("utf-32-be"), "Expecting value"),
    ],
    ids=["cut-short", "single-quotes", "nan", "huge-float", "deep", "utf-16", "utf-32"],
)
def test_bytes_that_are_not_json(line: bytes, why: str) -> None:
    with pytest.raises(QMPProtocolError) as err:
        feed_all(line + b"\n")
    assert str(err.value).startswith(f"QMP message: expected JSON, found {line[:60]!r} (")
    assert why in str(err.value)


@pytest.mark.parametrize(
    "line",
    [
        b'{"return": "\xff\xfe", "id": 1}',  # not UTF-8 at all
        b'{"return": "\xc3", "id": 1}',  # a sequence cut short
        b'{"return": "\xed\xa0\x80", "id": 1}',  # a surrogate, which UTF-8 excludes
    ],
    ids=["invalid-byte", "truncated-sequence", "surrogate"],
)
def test_bytes_that_are_not_utf8(line: bytes) -> None:
    with pytest.raises(QMPProtocolError) as err:
        feed_all(line + b"\n")
    assert str(err.value).startswith(f"QMP message: expected UTF-8, found {line[:60]!r} (")


def test_a_reply_with_another_id() -> None:
    with pytest.raises(QMPProtocolError) as err:
        reply_value("query-block", 3, json.loads(REPLY))
    assert str(err.value) == "QMP reply to query-block: expected id 3, found 2"
    with pytest.raises(QMPProtocolError) as err:
        reply_value("query-block", 3, {"return": {}, "id": "3"})
    assert str(err.value) == "QMP reply to query-block: expected id 3, found '3'"


def test_a_reply_with_neither_return_nor_error() -> None:
    with pytest.raises(QMPProtocolError) as err:
        reply_value("stop", 1, {"id": 1, "result": {}})
    assert str(err.value) == (
        "QMP reply to stop: expected 'return' or 'error', found {\"id\": 1, \"result\": {}}"
    )


def test_a_well_formed_error_is_qemus_refusal() -> None:
    error = {"class": "GenericError", "desc": "Node 'x' not found"}
    with pytest.raises(QMPError) as err:
        reply_value("blockdev-del", 5, {"error": error, "id": 5})
    assert str(err.value) == "QEMU refused blockdev-del: Node 'x' not found (GenericError)"
    assert (err.value.command, err.value.error_class) == ("blockdev-del", "GenericError")


@pytest.mark.parametrize(
    "error",
    [
        "GenericError",
        ["GenericError", "no"],
        {"class": "GenericError"},
        {"desc": "no class"},
        {"class": 7, "desc": "class not a string"},
        {"class": "GenericError", "desc": None},
    ],
)
def test_a_malformed_error_object(error: object) -> None:
    shown = repr(error) if isinstance(error, str) else json.dumps(error)
    with pytest.raises(QMPProtocolError) as err:
        reply_value("blockdev-add", 4, {"error": error, "id": 4})
    assert str(err.value) == (
        "QMP reply to blockdev-add: error: expected an object with 'class' and 'desc' "
        f"strings, found {shown}"
    )
    assert not isinstance(err.value, QMPError)


@pytest.mark.parametrize(
    "greeting",
    [
        {},
        {"QMP": None},
        {"QMP": {}},
        {"QMP": {"version": "8.2.0", "capabilities": []}},
        {"return": {}, "id": 1},
        {"event": "SHUTDOWN", "data": {}},
    ],
)
def test_a_greeting_without_its_members(greeting: dict[str, object]) -> None:
    with pytest.raises(QMPProtocolError) as err:
        check_greeting(greeting)
    assert str(err.value) == (
        f"QMP greeting: expected {{'QMP': {{'version': ...}}}}, found {json.dumps(greeting)}"
    )


def test_a_greeting_whose_capabilities_are_not_a_list() -> None:
    with pytest.raises(QMPProtocolError) as err:
        check_greeting({"QMP": {"version": {}, "capabilities": "oob"}})
    assert str(err.value) == "QMP greeting: capabilities: expected a list, found 'oob'"


def test_fields_of_the_wrong_type() -> None:
    with pytest.raises(QMPProtocolError) as err:
        members({"device": "virtio0"}, "query-block")
    assert str(err.value) == (
        'query-block: expected a list of objects, found {"device": "virtio0"}'
    )
    with pytest.raises(QMPProtocolError) as err:
        members([{"device": "virtio0"}, 3], "query-block")
    assert (
        str(err.value)
        == 'query-block: expected a list of objects, found [{"device": "virtio0"}, 3]'
    )
    with pytest.raises(QMPProtocolError) as err:
        text({"node-name": 3}, "node-name", "query-named-block-nodes")
    assert str(err.value) == "query-named-block-nodes: node-name: expected a string, found 3"
    with pytest.raises(QMPProtocolError) as err:
        flag({"ro": "yes"}, "ro", "query-named-block-nodes")
    assert str(err.value) == "query-named-block-nodes: ro: expected true or false, found 'yes'"


def test_every_error_is_an_addcow_error() -> None:
    assert issubclass(QMPProtocolError, AddCowError)
    assert issubclass(QMPError, AddCowError)
    long = {"id": 1, "result": "x" * 500}
    with pytest.raises(QMPProtocolError) as err:
        reply_value("stop", 1, long)
    shown = json.dumps(long)[:77] + "..."  # what was found, shortened
    assert str(err.value) == f"QMP reply to stop: expected 'return' or 'error', found {shown}"
