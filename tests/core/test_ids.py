import pytest
from durable.client import Env
from durable.core.errors import InvalidId
from durable.core.ids import _HEX64, IdFactory, namespace_key


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


# ----- IdFactory alone, without servers ---------------------------------------------------------

KEY = namespace_key("unit-secret", "Counter")


def test_an_id_is_64_lowercase_hex_a_base_and_its_keyed_checksum() -> None:
    ids = IdFactory("Counter", KEY)
    named = ids.from_name("alpha")
    assert _HEX64.fullmatch(named.hex) and named.name == "alpha" and str(named) == named.hex
    assert named == ids.from_name("alpha") and hash(named) == hash(ids.from_name("alpha"))
    assert named != ids.from_name("alpha ") and named != named.hex  # an ObjectId is not its string
    unique = ids.unique()
    assert unique.name is None and unique != ids.unique()
    for oid in (named, unique):
        assert ids.from_string(oid.hex) == oid and ids.from_string(oid.hex).name is None


def test_a_namespace_key_depends_on_the_secret_and_the_identity() -> None:
    keys = {namespace_key(s, i) for s in ("a", "b") for i in ("Counter", "Probe")}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert namespace_key("a", "Counter") == namespace_key("a", "Counter")


@pytest.mark.parametrize("bad", ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, " " + "0" * 63, "0" * 63 + "\n", 5, None,
                                 b"0" * 64])
def test_from_string_refuses_what_is_not_64_lowercase_hex(bad: object) -> None:
    with pytest.raises(InvalidId, match="must be 64 hex digits"):
        IdFactory("Counter", KEY).from_string(bad)  # type: ignore[arg-type]


def test_from_string_refuses_a_changed_checksum_or_base() -> None:
    ids = IdFactory("Counter", KEY)
    good = ids.from_name("x").hex
    for i in (0, 31, 32, 63):  # a digit of the base, or of the checksum
        changed = good[:i] + ("1" if good[i] == "0" else "0") + good[i + 1:]
        with pytest.raises(InvalidId, match="not valid for namespace 'Counter'"):
            ids.from_string(changed)


def test_names_up_to_1024_utf8_bytes_are_accepted_and_longer_or_non_str_names_refused() -> None:
    ids = IdFactory("Counter", KEY)
    assert ids.from_name("é" * 512).name == "é" * 512  # 1024 bytes
    with pytest.raises(InvalidId, match="a name of 1026 bytes"):
        ids.from_name("é" * 513)
    with pytest.raises(InvalidId, match="must be str, not int"):
        ids.from_name(5)  # type: ignore[arg-type]
    assert ids.from_name("").hex != ids.from_name(" ").hex


def test_name_matches_only_the_names_own_id() -> None:
    ids = IdFactory("Counter", KEY)
    oid = ids.from_name("x").hex
    assert ids.name_matches(oid, "x")
    assert not ids.name_matches(oid, "y") and not ids.name_matches(ids.unique().hex, "x")
    assert not ids.name_matches(oid, "x" * 2000)  # an overlong claimed name is no match, not an error
