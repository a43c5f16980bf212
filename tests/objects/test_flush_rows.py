"""The flush's column arrays, built without a database: each write lands in its own column."""

from __future__ import annotations

from durable.objects.alarm_rules import AlarmRow
from durable.objects.pending import Batch
from durable.objects.sql import _FLUSH, FlushRows, Owner, flush_rows


def _batch(**kw: object) -> Batch:
    defaults: dict[str, object] = {"delete_all": False, "writes": {}, "alarm_changed": False, "alarm": None,
                                   "sockets": {}, "seq": 1}
    defaults.update(kw)
    return Batch(**defaults)  # type: ignore[arg-type]


def test_writes_deletes_alarms_and_sockets_go_to_their_columns() -> None:
    a, b = Owner("a" * 64, "Counter", 3, 10), Owner("b" * 64, "Room", 1, 7)
    rows = flush_rows([
        (a, _batch(writes={b"k1": b"v1", b"k2": None}, alarm_changed=True, alarm=AlarmRow(100, 150, 9, 2))),
        (b, _batch(delete_all=True, alarm_changed=True, alarm=None,
                   sockets={"s1": ("gw", '["t"]', b"att", "ping", "pong"), "s2": None})),
    ], audit_worker="w1")
    assert rows.parts == [1, 3] and rows.epochs == [7, 10]  # sorted: the order flushes lock rows in
    assert (rows.up_o, rows.up_k, rows.up_ns, rows.up_v) == (["a" * 64], [b"k1"], ["Counter"], [b"v1"])
    assert (rows.del_o, rows.del_k) == (["a" * 64], [b"k2"])
    assert (rows.alarm_o, rows.alarm_p, rows.alarm_sched, rows.alarm_due, rows.alarm_gen, rows.alarm_retry) == \
        (["a" * 64], [3], [100], [150], [9], [2])
    assert rows.wiped == ["b" * 64] and rows.alarm_del == ["b" * 64]
    assert (rows.sock_id, rows.sock_o, rows.sock_ns, rows.sock_p, rows.sock_gw, rows.sock_tags, rows.sock_att,
            rows.sock_auto_req, rows.sock_auto_res) == \
        (["s1"], ["b" * 64], ["Room"], [1], ["gw"], ['["t"]'], [b"att"], ["ping"], ["pong"])
    assert rows.sock_del == ["s2"] and rows.audit_worker == "w1"
    assert rows.row_count == 1 + 1 + 1 + 1 + 1 + 1


def test_an_unchanged_alarm_is_not_written() -> None:
    rows = flush_rows([(Owner("c" * 64, "C", 0, 1), _batch(alarm=AlarmRow(1, 1, 1)))])
    assert rows.alarm_o == [] and rows.alarm_del == [] and rows.audit_worker is None


def test_the_flush_call_names_every_parameter_in_order() -> None:
    names = [name for name in FlushRows.__dataclass_fields__]
    assert _FLUSH.startswith("SELECT do_flush(parts => $1, epochs => $2, wiped => $3")
    assert _FLUSH.count("=>") == len(names) == 40
    assert _FLUSH.endswith(f"audit_worker => ${len(names)})")


def test_idempotency_records_go_to_their_columns() -> None:
    from durable.objects.pending import IdempotencyRecord

    a = Owner("a" * 64, "Counter", 3, 10)
    rows = flush_rows([(a, _batch(idempotency={"k1": IdempotencyRecord("rpc.increment", b"reply", 99),
                                               "k2": IdempotencyRecord("fetch", None, 100)}))])
    assert (rows.idem_o, rows.idem_k, rows.idem_ns, rows.idem_p, rows.idem_fp, rows.idem_reply, rows.idem_exp) == \
        (["a" * 64] * 2, ["k1", "k2"], ["Counter"] * 2, [3, 3], ["rpc.increment", "fetch"], [b"reply", None],
         [99, 100])
    assert rows.row_count == 2


def test_events_go_to_their_columns_in_emit_order() -> None:
    from durable.objects.events import EventRecord

    a, b = Owner("a" * 64, "Counter", 3, 10), Owner("b" * 64, "Room", 1, 7)
    rows = flush_rows([
        (a, _batch(events=[EventRecord("evt.Counter.a.x", b"1", None),
                           EventRecord("evt.Counter.a.y", b"2", '{"h":"v"}')])),
        (b, _batch(events=[EventRecord("evt.Room.b.m", b"3", None)])),
    ])
    assert (rows.evt_o, rows.evt_p, rows.evt_subject, rows.evt_payload, rows.evt_headers) == \
        (["a" * 64, "a" * 64, "b" * 64], [3, 3, 1], ["evt.Counter.a.x", "evt.Counter.a.y", "evt.Room.b.m"],
         [b"1", b"2", b"3"], [None, '{"h":"v"}', None])
    assert rows.row_count == 3
