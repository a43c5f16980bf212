import pytest
from durable.client import Env
from durable.core.errors import InvalidId
from durable.core.ids import IdFactory, namespace_key


def test_id_from_name_is_deterministic_and_carries_the_name(env: Env) -> None:
    a = env.COUNTERS.id_from_name("alpha")
    assert a == env.COUNTERS.id_from_name("alpha")
    assert a.name == "alpha"
    assert len(a.hex) == 64 and a.hex == a.hex.lower()
    assert a != env.COUNTERS.id_from_name("beta")


def test_the_same_name_gives_different_ids_in_different_namespaces(env: Env) -> None:
    assert env.COUNTERS.id_from_name("x").hex != env.PROBES.id_from_name("x").hex


def test_new_unique_id_is_valid_and_unnamed(env: Env) -> None:
    u = env.COUNTERS.new_unique_id()
    assert u.name is None
    assert env.COUNTERS.id_from_string(u.hex) == u
    assert u != env.COUNTERS.new_unique_id()


def test_id_from_string_round_trips_without_the_name(env: Env) -> None:
    a = env.COUNTERS.id_from_name("alpha")
    parsed = env.COUNTERS.id_from_string(a.hex)
    assert parsed == a and parsed.name is None


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "A" * 64, "0" * 63, "0" * 65, " " + "0" * 63])
def test_id_from_string_rejects_malformed_hex(env: Env, bad: str) -> None:
    with pytest.raises(InvalidId, match="must be 64 hex digits"):
        env.COUNTERS.id_from_string(bad)


def test_id_from_string_rejects_ids_of_another_namespace(env: Env) -> None:
    other = env.PROBES.id_from_name("x").hex
    with pytest.raises(InvalidId, match="not valid for namespace 'Counter'"):
        env.COUNTERS.id_from_string(other)
    flipped = ("1" if other[0] == "0" else "0") + other[1:]
    with pytest.raises(InvalidId):
        env.PROBES.id_from_string(flipped)


def test_ids_made_under_another_secret_are_rejected() -> None:
    ours = IdFactory("Counter", namespace_key("secret-a", "Counter"))
    theirs = IdFactory("Counter", namespace_key("secret-b", "Counter"))
    with pytest.raises(InvalidId):
        ours.from_string(theirs.from_name("x").hex)


def test_overlong_names_are_refused(env: Env) -> None:
    with pytest.raises(InvalidId, match="1024 bytes"):
        env.COUNTERS.id_from_name("x" * 1025)


async def test_the_object_knows_its_name_only_when_addressed_by_name(worker: object, env: Env) -> None:
    by_name = await env.PROBES.get_by_name("named").whoami()
    assert by_name == {"id": env.PROBES.id_from_name("named").hex, "name": "named"}
    # the same object addressed by id string: a fresh stub has no name to tell
    unique = env.PROBES.new_unique_id()
    assert (await env.PROBES.get(unique).whoami())["name"] is None
