"""``[[subscriptions]]``: a bad entry stops start-up with a ConfigError naming the entry and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from durable.core.config import parse_config
from durable.core.errors import ConfigError

PATH = Path("app/durable.toml")


def config(**entry: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {"name": "orders", "stream": "ORDERS", "subject": "orders.*.created", "object_token": 2,
                           "binding": "ORDERS"}
    sub.update(entry)
    return {"bindings": {"ORDERS": "app:Order"}, "migrations": [{"tag": "v1", "new_classes": ["Order"]}],
            "subscriptions": [{k: v for k, v in sub.items() if v is not None}]}


def test_a_good_entry_gets_its_defaults_and_names_the_object_by_its_token() -> None:
    (sub,) = parse_config(PATH, config()).subscriptions
    assert (sub.name, sub.stream, sub.binding, sub.namespace) == ("orders", "ORDERS", "ORDERS", "Order")
    assert (sub.handler, sub.max_attempts) == ("on_message", 5)
    assert sub.object_name("orders.o-17.created") == "o-17"
    assert sub.object_name("orders") is None


def test_a_token_inside_a_trailing_full_wildcard_is_allowed() -> None:
    (sub,) = parse_config(PATH, config(subject="orders.>", object_token=3)).subscriptions
    assert sub.object_name("orders.eu.o-1.created") == "o-1" and sub.object_name("orders.eu") is None


@pytest.mark.parametrize(("entry", "problem"), [
    ({"binding": "NOPE"},
     r"subscriptions\[0\] \('orders'\): binding: no binding 'NOPE' in \[bindings\] \(have: ORDERS\)"),
    ({"object_token": 1}, r"object_token: token 1 of 'orders.\*.created' is 'orders', not a wildcard"),
    ({"object_token": 4}, r"object_token: 'orders.\*.created' has 3 tokens, so token 4 never names an object"),
    ({"object_token": 0}, r"object_token: tokens are counted from 1"),
    ({"subject": "orders..created"}, r"subject: 'orders..created' is not a NATS subject filter"),
    ({"subject": "orders.>.created"}, r"is not a NATS subject filter"),
    ({"subject": "orders.a*.created"}, r"is not a NATS subject filter"),
    ({"name": "a.b"}, r"name: must be one subject token"),
    ({"stream": "OR.DERS"}, r"stream: 'OR.DERS' is not a JetStream stream name"),
    ({"handler": "_private"}, r"handler: '_private' must name a public method"),
    ({"max_attempts": 0}, r"subscriptions.0.max_attempts: Input should be greater than or equal to 1"),
    ({"object_token": None}, r"subscriptions.0.object_token: Field required"),
    ({"queue": "x"}, r"subscriptions.0.queue: unknown key"),
])
def test_a_bad_entry_is_a_config_error_naming_it(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(PATH, config(**entry))


def test_two_subscriptions_cannot_share_a_name() -> None:
    data = config()
    data["subscriptions"].append(dict(data["subscriptions"][0]))
    with pytest.raises(ConfigError, match=r"subscriptions\[1\] \('orders'\): name: another subscription"):
        parse_config(PATH, data)


def test_a_declared_stream_is_checked_and_gets_its_defaults() -> None:
    data = config()
    data["streams"] = [{"name": "ORDERS", "subjects": ["orders.>"]}]
    (decl,) = parse_config(PATH, data).streams
    assert (decl.name, decl.subjects, decl.max_age, decl.replicas) == ("ORDERS", ("orders.>",), 0.0, 1)


@pytest.mark.parametrize(("stream", "problem"), [
    ({"name": "OR.DERS", "subjects": ["orders.>"]}, r"streams\[0\] \('OR.DERS'\): name: 'OR.DERS' is not a JetStream"),
    ({"name": "ORDERS", "subjects": ["orders..x"]}, r"subjects: 'orders..x' is not a NATS subject filter"),
    ({"name": "ORDERS", "subjects": []}, r"streams.0.subjects: List should have at least 1 item"),
    ({"name": "ORDERS", "subjects": ["a"], "replicas": 0}, r"streams.0.replicas: Input should be greater than"),
    ({"name": "ORDERS", "subjects": ["a"], "retention": "x"}, r"streams.0.retention: unknown key"),
])
def test_a_bad_stream_declaration_is_a_config_error_naming_it(stream: dict[str, Any], problem: str) -> None:
    data = config()
    data["streams"] = [stream]
    with pytest.raises(ConfigError, match=problem):
        parse_config(PATH, data)
