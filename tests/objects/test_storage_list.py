"""ctx.storage.list(): every option and every combination of options, checked against a small
reference implementation of Cloudflare's semantics, while writes are cached and after eviction
(where list() merges Postgres rows with the cache)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from durable.client import Env
from durable.core.errors import StorageError
from durable.objects import Worker
from durable.objects.storage import ListRange, _prefix_end

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

# Keys chosen so that UTF-8 byte order differs from UTF-16 order ("\uffff" is EF BF BF and
# "\U0001F600" is F0 9F 98 80, but in UTF-16 the emoji is D83D DE00 < FFFF), with multi-byte
# characters, keys that are prefixes of each other, the empty key, and NUL bytes inside keys.
KEYS = [
    "", "\x00", "\x00\x00", "a", "a\x00", "a\x00b", "ab", "abc", "abd", "ab\uffff", "ab\U0001F600",
    "b", "~", "é", "\uffff", "\U0001F600", "\U0001F600\x00",
]
DATA = {k: f"v{i}" for i, k in enumerate(KEYS)}

BOUNDS = ["", "\x00", "a", "a\x00", "abc", "ab\U0001F600", "\uffff", "\U0001F600"]
PREFIXES = ["", "\x00", "a", "ab", "\uffff", "\U0001F600", "x"]
CANDIDATES: dict[str, list[Any]] = {
    "start": BOUNDS, "start_after": BOUNDS, "end": BOUNDS, "prefix": PREFIXES,
    "reverse": [True], "limit": [1, 3],
}

# Writes made after eviction: deletes of existing keys at both ends of the key space (they must
# hide Postgres rows, also under a limit), a delete of a missing key, new keys and overwrites.
MUTATION_DELETES = ["", "\x00", "ab", "abc", "\U0001F600\x00", "missing"]
MUTATION_PUTS = {"aa": "new-aa", "ab\x00": "new-ab0", "abd": "changed-abd", "\uffff": "changed-ffff"}


def mutated(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in MUTATION_DELETES}
    out.update(MUTATION_PUTS)
    return out


def reference_list(data: dict[str, Any], *, start: str | None = None, start_after: str | None = None,
                   end: str | None = None, prefix: str | None = None, reverse: bool = False,
                   limit: int | None = None) -> list[tuple[str, Any]]:
    """Cloudflare's list(), by definition rather than by range arithmetic: keys compared as UTF-8
    bytes, start inclusive, start_after and end exclusive, prefix a filter, reverse flips the
    order but not the bounds, then limit takes the first N."""
    def b(s: str) -> bytes:
        return s.encode()

    keys = [k for k in sorted(data, key=b)
            if (start is None or b(k) >= b(start))
            and (start_after is None or b(k) > b(start_after))
            and (end is None or b(k) < b(end))
            and (prefix is None or b(k).startswith(b(prefix)))]
    if reverse:
        keys.reverse()
    if limit is not None:
        keys = keys[:limit]
    return [(k, data[k]) for k in keys]


def is_full_listing(options: dict[str, Any]) -> bool:
    """Whether the options ask for every key (after which the object's cache may know them all)."""
    return (not ({"start_after", "end", "limit"} & options.keys())
            and not options.get("start") and not options.get("prefix"))


def option_combinations() -> list[dict[str, Any]]:
    """Every subset of the options (start and start_after never together), with every candidate
    value. Full listings (which let the cache take over) come last, so the others hit Postgres."""
    names = list(CANDIDATES)
    combos: list[dict[str, Any]] = []
    for r in range(len(names) + 1):
        for subset in itertools.combinations(names, r):
            if "start" in subset and "start_after" in subset:
                continue
            for values in itertools.product(*(CANDIDATES[n] for n in subset)):
                combos.append(dict(zip(subset, values, strict=True)))
    return sorted(combos, key=is_full_listing)


COMBOS = option_combinations()
CHUNK = 800


def chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def check_results(data: dict[str, Any], combos: list[dict[str, Any]], results: list[Any]) -> None:
    assert len(results) == len(combos)
    failures = []
    for options, got in zip(combos, results, strict=True):
        want = reference_list(data, **options)
        if list(got.items()) != want:
            failures.append(f"list({options!r}) -> {list(got.items())!r}, expected {want!r}")
    assert not failures, f"{len(failures)} of {len(combos)} combinations differ:\n" + "\n".join(failures[:20])


async def list_all_combinations(probe: Any, puts: dict[str, Any] | None = None,
                                deletes: list[str] | None = None) -> list[Any]:
    """Run every combination, the writes (if any) in the same event as the first chunk."""
    results: list[Any] = []
    for i, chunk in enumerate(chunks(COMBOS)):
        if i == 0:
            results += await probe.list_many(chunk, puts, deletes)
        else:
            results += await probe.list_many(chunk)
    return results


async def wait_evicted(worker: Worker) -> None:
    async def evicted() -> bool:
        return worker.live_objects() == 0

    await assert_eventually(evicted, message="the object was evicted")


def test_the_combinations_cover_every_subset_of_options() -> None:
    subsets = {frozenset(o) for o in COMBOS}
    assert len(subsets) == 2 ** 6 - 2 ** 4  # all subsets except those with both start and start_after
    assert len(COMBOS) == (1 + 2 * len(BOUNDS)) * (1 + len(BOUNDS)) * (1 + len(PREFIXES)) * 2 * 3


def test_the_reference_orders_keys_by_utf8_bytes_not_by_utf16_code_units() -> None:
    keys = [k for k, _ in reference_list(DATA)]
    assert keys.index("\uffff") < keys.index("\U0001F600")
    assert sorted(["\uffff", "\U0001F600"], key=lambda s: s.encode("utf-16-be")) == ["\U0001F600", "\uffff"]
    assert keys[:3] == ["", "\x00", "\x00\x00"]


# ----- single options, as readable examples ----------------------------------------------------


async def test_list_with_no_options_returns_every_key_in_utf8_byte_order(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-plain")
    await probe.storage("put", DATA)
    got = await probe.storage("list")
    assert list(got.items()) == reference_list(DATA)
    assert list(got)[-3:] == ["\uffff", "\U0001F600", "\U0001F600\x00"]


async def test_list_of_an_object_without_keys_is_empty(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-empty")
    assert await probe.storage("list") == {}
    assert await probe.storage("list", prefix="a", reverse=True, limit=3) == {}


async def test_list_start_is_inclusive_and_end_is_exclusive(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-start-end")
    await probe.storage("put", DATA)
    got = await probe.storage("list", start="a", end="abd")
    assert list(got) == ["a", "a\x00", "a\x00b", "ab", "abc"]


async def test_list_start_after_excludes_only_that_key_even_when_the_next_key_adds_a_nul(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-start-after")
    await probe.storage("put", DATA)
    got = await probe.storage("list", start_after="a", end="ab")
    assert list(got) == ["a\x00", "a\x00b"]
    got = await probe.storage("list", start_after="", limit=2)
    assert list(got) == ["\x00", "\x00\x00"]


async def test_list_prefix_returns_the_keys_starting_with_it_including_the_prefix_itself(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-prefix")
    await probe.storage("put", DATA)
    assert list(await probe.storage("list", prefix="ab")) == ["ab", "abc", "abd", "ab\uffff", "ab\U0001F600"]
    assert list(await probe.storage("list", prefix="\U0001F600")) == ["\U0001F600", "\U0001F600\x00"]
    assert list((await probe.storage("list", prefix="")).items()) == reference_list(DATA)  # no restriction
    assert await probe.storage("list", prefix="x") == {}


async def test_list_start_below_the_prefix_starts_at_the_prefix_and_start_past_it_is_empty(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-prefix-clamp")
    await probe.storage("put", DATA)
    assert list(await probe.storage("list", prefix="ab", start="a")) == ["ab", "abc", "abd", "ab\uffff",
                                                                          "ab\U0001F600"]
    assert await probe.storage("list", prefix="ab", start="b") == {}
    assert await probe.storage("list", prefix="ab", end="ab") == {}
    assert list(await probe.storage("list", prefix="ab", end="abd")) == ["ab", "abc"]


async def test_list_reverse_keeps_the_bounds_and_returns_the_largest_keys_first_under_a_limit(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-reverse")
    await probe.storage("put", DATA)
    got = await probe.storage("list", start="a", end="b", reverse=True, limit=3)
    assert list(got) == ["ab\U0001F600", "ab\uffff", "abd"]
    got = await probe.storage("list", reverse=True, limit=2)
    assert list(got) == ["\U0001F600\x00", "\U0001F600"]
    got = await probe.storage("list", reverse=False, limit=2)
    assert list(got) == ["", "\x00"]


async def test_list_with_end_at_or_before_start_is_empty_not_an_error(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-end-before-start")
    await probe.storage("put", DATA)
    assert await probe.storage("list", start="b", end="b") == {}
    assert await probe.storage("list", start="b", end="a") == {}
    assert await probe.storage("list", start_after="a", end="a\x00") == {}
    assert await probe.storage("list", start="\U0001F600", end="\uffff", reverse=True) == {}


async def test_list_limit_counts_entries_and_a_large_limit_returns_everything(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-limit")
    await probe.storage("put", DATA)
    assert list(await probe.storage("list", limit=1)) == [""]
    assert len(await probe.storage("list", limit=len(KEYS) + 100)) == len(KEYS)


async def test_list_with_both_start_and_start_after_is_an_error(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-both-starts")
    await probe.storage("put", DATA)
    with pytest.raises(StorageError, match="cannot be called with both start and start_after") as info:
        await probe.storage("list", start="a", start_after="a")
    assert info.value.code == "storage"


@pytest.mark.parametrize("limit", [0, -1])
async def test_list_limit_must_be_positive(worker: Worker, env: Env, limit: int) -> None:
    probe = env.PROBES.get_by_name(f"list-limit-{limit}")
    await probe.storage("put", DATA)
    with pytest.raises(StorageError, match="List limit must be positive"):
        await probe.storage("list", limit=limit)


async def test_list_bounds_may_be_longer_than_the_key_limit(worker: Worker, env: Env) -> None:
    # Cloudflare limits stored keys to 2048 bytes but not list() bounds: end=key+"\x00" must work
    # for a key of the maximum size.
    probe = env.PROBES.get_by_name("list-long-bounds")
    longest = "k" * 2048
    await probe.storage("put", {longest: 1, "k": 2, "l": 3})
    assert await probe.storage("list", start=longest, end=longest + "\x00") == {longest: 1}
    assert list(await probe.storage("list", start="k" * 3000)) == ["l"]
    assert list(await probe.storage("list", start_after=longest)) == ["l"]
    assert list(await probe.storage("list", end="k" * 3000, reverse=True)) == [longest, "k"]
    assert await probe.storage("list", prefix="k" * 3000) == {}


async def test_list_bounds_that_are_not_strings_are_an_error(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-bound-types")
    for options in [{"start": 1}, {"start_after": b"a"}, {"end": 2.5}, {"prefix": ["a"]}]:
        with pytest.raises(StorageError, match="must be a str"):
            await probe.storage("list", **options)


# ----- every combination -----------------------------------------------------------------------


async def test_every_combination_of_list_options_matches_the_reference_while_writes_are_cached(
        worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("list-combos-cached")
    results = await list_all_combinations(probe, puts=DATA)
    check_results(DATA, COMBOS, results)


async def test_every_combination_matches_the_reference_after_eviction_merging_postgres_rows_and_cache(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("list-combos-evicted")
    await probe.storage("put", DATA)
    await wait_evicted(worker)

    # A new instance: deletes and puts are in its cache (and pending) while the old rows are in Postgres.
    data = mutated(DATA)
    results = await list_all_combinations(probe, puts=MUTATION_PUTS, deletes=MUTATION_DELETES)
    check_results(data, COMBOS, results)

    # Another new instance: everything comes from Postgres.
    await wait_evicted(worker)
    results = await list_all_combinations(probe)
    check_results(data, COMBOS, results)


async def test_every_combination_inside_a_transaction_merges_its_own_writes_with_storage(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("list-combos-txn")
    await probe.storage("put", DATA)
    await wait_evicted(worker)
    results: list[Any] = []
    for chunk in chunks(COMBOS):
        results += await probe.txn_list_many(chunk, MUTATION_PUTS, MUTATION_DELETES)
    check_results(mutated(DATA), COMBOS, results)
    # the transactions were rolled back
    assert list((await probe.storage("list")).items()) == reference_list(DATA)


# ----- deleted keys hiding Postgres rows ------------------------------------------------------


async def test_cached_deletes_hide_postgres_rows_under_a_limit_in_both_directions(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("list-hidden")
    await probe.storage("put", {f"k{i:02}": i for i in range(20)})
    await wait_evicted(worker)

    deletes = [f"k{i:02}" for i in (*range(5), *range(15, 20))]
    results = await probe.list_many(
        [{"limit": 3}, {"limit": 3, "reverse": True}, {"prefix": "k0", "limit": 2},
         {"start": "k00", "end": "k05", "limit": 1}, {"start_after": "k14", "limit": 1}],
        None, deletes,
    )
    assert [list(r) for r in results] == [
        ["k05", "k06", "k07"], ["k14", "k13", "k12"], ["k05", "k06"], [], [],
    ]
    # and the same once the deletes are in Postgres
    await wait_evicted(worker)
    assert list(await probe.storage("list", limit=3)) == ["k05", "k06", "k07"]
    assert list(await probe.storage("list", limit=3, reverse=True)) == ["k14", "k13", "k12"]


async def test_a_full_listing_followed_by_writes_and_bounded_listings_stays_correct(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("list-full-then-bounded")
    await probe.storage("put", DATA)
    await wait_evicted(worker)
    options = [{}, {"prefix": "ab"}, {"reverse": True, "limit": 2}, {}]
    results = await probe.list_many(options, MUTATION_PUTS, MUTATION_DELETES)
    check_results(mutated(DATA), options, results)
    assert list((await probe.storage("get", ["", "aa", "abd", "missing"])).items()) == [
        ("aa", "new-aa"), ("abd", "changed-abd"),
    ]


# ----- ListRange and _prefix_end: the options as a byte range, without a worker -----------------


@pytest.mark.parametrize(("prefix", "end"), [
    (b"a", b"b"), (b"ab", b"ac"), (b"a\xfe", b"a\xff"), (b"a\xff", b"b"), (b"ab\xff\xff", b"ac"),
    (b"\xff", None), (b"\xff\xff\xff", None), (b"", None), (b"\x00", b"\x01"),
])
def test_prefix_end_is_the_smallest_key_past_every_key_with_the_prefix(prefix: bytes, end: bytes | None) -> None:
    assert _prefix_end(prefix) == end
    for key in (prefix, prefix + b"\x00", prefix + b"\xff" * 3):
        assert end is None or key < end


def _range(**options: Any) -> ListRange:
    values: dict[str, Any] = {"start": None, "start_after": None, "end": None, "prefix": None,
                              "reverse": False, "limit": None}
    values.update(options)
    return ListRange(**values)


def test_list_range_without_options_is_everything() -> None:
    r = _range()
    assert (r.lo, r.hi, r.reverse, r.limit, r.empty) == (b"", None, False, None, False)
    assert r.contains(b"") and r.contains(b"\xff" * 10)


def test_list_range_start_is_inclusive_end_exclusive_and_start_after_exclusive() -> None:
    r = _range(start="b", end="d")
    assert (r.lo, r.hi) == (b"b", b"d")
    assert r.contains(b"b") and r.contains(b"c\xff") and not r.contains(b"d") and not r.contains(b"a\xff")
    r = _range(start_after="b", end="d")
    assert r.lo == b"b\x00"
    assert not r.contains(b"b") and r.contains(b"b\x00") and r.contains(b"b\x00\x00")


def test_list_range_prefix_bounds_both_ends_and_meets_start_and_end() -> None:
    r = _range(prefix="ab")
    assert (r.lo, r.hi) == (b"ab", b"ac")
    assert r.contains(b"ab") and r.contains(b"ab\xff") and not r.contains(b"aa\xff") and not r.contains(b"ac")
    assert (_range(prefix="ab", start="a").lo, _range(prefix="ab", start="abc").lo) == (b"ab", b"abc")
    assert _range(prefix="ab", end="abc").hi == b"abc" and _range(prefix="ab", end="b").hi == b"ac"
    assert _range(prefix="ab", start="b").empty  # a start past the prefix: nothing, not an error
    assert _range(prefix="ab", start_after="ab").lo == b"ab\x00"
    # the largest code point: its UTF-8 is not 0xff-padded, so the prefix still has an end
    top = _range(prefix="\U0010ffff")
    assert (top.lo, top.hi) == (b"\xf4\x8f\xbf\xbf", b"\xf4\x8f\xbf\xc0")
    assert _range(prefix="").hi is None and _range(prefix="").lo == b""  # an empty prefix bounds nothing


@pytest.mark.parametrize(("start", "end", "empty"), [("b", "b", True), ("c", "b", True), ("b", "b\x00", False)])
def test_list_range_with_end_at_or_before_start_is_empty(start: str, end: str, empty: bool) -> None:
    assert _range(start=start, end=end).empty is empty


def test_list_range_keeps_reverse_and_limit_and_allows_long_bounds() -> None:
    r = _range(reverse=1, limit=3)
    assert r.reverse is True and r.limit == 3
    long = "k" * 5000  # bounds are not keys: no size limit
    assert _range(start=long, end=long + "z").lo == long.encode()


@pytest.mark.parametrize(("options", "message"), [
    ({"start": "a", "start_after": "a"}, "both start and start_after"),
    ({"limit": 0}, "List limit must be positive"),
    ({"limit": -1}, "List limit must be positive"),
    ({"limit": True}, "List limit must be positive"),
    ({"limit": 1.5}, "List limit must be positive"),
    ({"limit": "3"}, "List limit must be positive"),
    ({"start": 5}, "option start must be a str, not int"),
    ({"start_after": b"a"}, "option start_after must be a str, not bytes"),
    ({"end": ["a"]}, "option end must be a str, not list"),
    ({"prefix": 1}, "option prefix must be a str, not int"),
    ({"prefix": "a\ud800"}, "lone surrogate"),
    ({"end": "\udfff"}, "lone surrogate"),
])
def test_list_range_refuses_bad_options_with_a_storage_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(StorageError, match=message):
        _range(**options)
