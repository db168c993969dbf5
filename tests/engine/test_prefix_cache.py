"""PrefixCache: full pages of KV indexed by their whole token prefix, with LRU eviction (host only)."""

from __future__ import annotations

from jinfer.engine.kv_pages import PageAllocator
from jinfer.engine.prefix_cache import PrefixCache

PS = 2  # tokens per page: small, so that prefixes of a few tokens span several pages


def make(num_pages: int = 10) -> tuple[PageAllocator, PrefixCache]:
    a = PageAllocator(num_pages)
    return a, PrefixCache(a, PS)


def computed(a: PageAllocator, c: PrefixCache, tokens: list[int]) -> list[int]:
    """A request that computed the KV of `tokens` into fresh pages and offered its full pages to the cache."""
    pages = a.allocate(-(-len(tokens) // PS))
    c.insert(tokens, pages, len(tokens) // PS)
    return pages


def release_all(c: PrefixCache, pages: list[int]) -> None:
    for p in reversed(pages):  # last page first, as the scheduler releases
        c.release(p)


def test_match_returns_the_cached_full_pages_and_holds_them():
    a, c = make()
    pages = computed(a, c, [1, 2, 3, 4, 5])  # two full pages and a partial one
    assert len(c) == 2
    assert c.match([1, 2, 3, 4, 6, 7], max_pages=10) == pages[:2]
    assert a.refcount[pages[:2]].tolist() == [2, 2]
    assert a.refcount[pages[2]] == 1  # the partial page is never indexed nor shared


def test_a_partial_page_of_the_query_never_matches():
    a, c = make()
    pages = computed(a, c, [1, 2, 3, 4])
    assert c.match([1, 2, 3], max_pages=10) == pages[:1]
    assert a.refcount[pages[1]] == 1


def test_match_needs_the_whole_prefix_equal_not_just_the_page():
    a, c = make()
    computed(a, c, [1, 2, 3, 4])
    # Page 1 holds [3, 4] in both, but its KV depends on page 0, which differs.
    assert c.match([9, 9, 3, 4], max_pages=10) == []
    assert c.match([1, 9, 3, 4], max_pages=10) == []


def test_match_stops_at_the_first_differing_page():
    a, c = make()
    pages = computed(a, c, [1, 2, 3, 4, 5, 6])
    assert c.match([1, 2, 3, 9, 5, 6], max_pages=10) == pages[:1]


def test_match_takes_at_most_max_pages():
    a, c = make()
    pages = computed(a, c, [1, 2, 3, 4, 5, 6])
    assert c.match([1, 2, 3, 4, 5, 6], max_pages=2) == pages[:2]
    assert c.match([1, 2, 3, 4, 5, 6], max_pages=0) == []
    assert a.refcount[pages].tolist() == [2, 2, 1]


def test_miss_holds_nothing():
    a, c = make()
    pages = computed(a, c, [1, 2])
    assert c.match([5, 6, 7], max_pages=10) == []
    assert a.refcount[pages].tolist() == [1]


def test_released_cached_page_becomes_evictable_not_free():
    a, c = make(6)
    pages = computed(a, c, [1, 2, 3])  # page 0 full and cached, page 1 partial and private
    release_all(c, pages)
    assert c.num_evictable == 1
    assert a.num_free == 5 - 1  # the private page went back, the cached one did not
    assert a.refcount[pages].tolist() == [0, 0]


def test_a_page_still_held_by_another_request_is_not_evictable():
    a, c = make()
    pages = computed(a, c, [1, 2])
    c.match([1, 2, 3], max_pages=10)
    c.release(pages[0])
    assert c.num_evictable == 0 and a.refcount[pages[0]] == 1
    c.release(pages[0])
    assert c.num_evictable == 1


def test_matching_an_evictable_page_revives_it():
    a, c = make()
    pages = computed(a, c, [1, 2, 3, 4])
    release_all(c, pages)
    assert c.num_evictable == 2
    assert c.match([1, 2, 3, 4, 5], max_pages=10) == pages
    assert c.num_evictable == 0 and a.refcount[pages].tolist() == [1, 1]
    assert c.evict(10) == 0  # held pages are never evicted


def test_evict_frees_least_recently_released_first_children_before_parents():
    a, c = make()
    old = computed(a, c, [1, 2, 3, 4])
    new = computed(a, c, [7, 8])
    release_all(c, old)  # the tail of `old`, then its head
    release_all(c, new)
    free = a.num_free
    assert c.evict(1) == 1
    assert a.num_free == free + 1
    # The tail went first: the head still matches, the two-page prefix no longer does.
    assert c.match([1, 2, 3, 4, 5], max_pages=10) == old[:1]
    c.release(old[0])  # now `old`'s head is the most recently used
    assert c.evict(1) == 1
    assert c.match([7, 8, 9], max_pages=10) == []
    assert c.match([1, 2, 3], max_pages=10) == old[:1]


def test_evict_returns_how_many_it_freed_and_evicted_pages_are_forgotten():
    a, c = make(6)
    pages = computed(a, c, [1, 2, 3, 4])
    release_all(c, pages)
    assert c.evict(5) == 2
    assert a.num_free == 5 and len(c) == 0 and c.num_evictable == 0
    assert c.match([1, 2, 3, 4, 5], max_pages=10) == []
    # The freed pages are handed out again, last freed (the head) first.
    assert a.allocate(2) == pages


def test_insert_is_incremental_and_idempotent():
    a, c = make()
    tokens = [1, 2, 3, 4, 5, 6]
    pages = a.allocate(3)
    c.insert(tokens, pages, 1)
    c.insert(tokens, pages, 1)
    assert len(c) == 1
    c.insert(tokens, pages, 3)
    assert len(c) == 3
    assert c.match(tokens + [7], max_pages=10) == pages


def test_a_duplicate_page_stays_private_and_its_descendants_chain_from_the_first():
    a, c = make()
    first = computed(a, c, [1, 2])
    # A second request computed the same first page on its own (it was admitted before the first was
    # indexed), then a second page.
    second = a.allocate(2)
    c.insert([1, 2, 3, 4], second, 2)
    assert len(c) == 2
    assert c.match([1, 2, 3, 4, 5], max_pages=10) == [first[0], second[1]]
    # Its private duplicate goes straight back to the free list on release.
    free = a.num_free
    c.release(second[0])
    assert a.num_free == free + 1


def test_a_page_is_never_indexed_under_two_keys():
    a, c = make()
    (p,) = a.allocate(1)
    c.insert([1, 2], [p], 1)
    c.insert([7, 8], [p], 1)
    assert len(c) == 1
    assert c.match([7, 8, 9], max_pages=10) == []


def test_stats_count_queried_and_hit_tokens():
    _, c = make()
    c.record_query(10, 4)
    c.record_query(6, 0)
    assert (c.stats.queried_tokens, c.stats.hit_tokens) == (16, 4)
