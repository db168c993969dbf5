"""PageAllocator: the free list and the refcounts of the KV page pool (host only)."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.engine.kv_pages import OutOfPages, PageAllocator


def test_page_zero_is_reserved_and_never_handed_out():
    a = PageAllocator(5)
    assert a.usable_pages == 4 and a.num_free == 4
    assert sorted(a.allocate(4)) == [1, 2, 3, 4]
    assert a.num_free == 0
    assert a.refcount[0] == 0


def test_a_pool_needs_at_least_one_usable_page():
    with pytest.raises(ValueError, match="num_pages=1 must be at least 2"):
        PageAllocator(1)
    assert PageAllocator(2).allocate(1) == [1]


def test_fresh_pool_hands_out_low_pages_first():
    assert PageAllocator(8).allocate(3) == [1, 2, 3]


def test_allocate_sets_refcount_to_one():
    a = PageAllocator(6)
    assert a.allocate(2) == [1, 2]
    assert a.refcount.tolist() == [0, 1, 1, 0, 0, 0]
    assert a.num_free == 3
    assert a.allocate(0) == [] and a.num_free == 3


def test_out_of_pages_says_how_many_were_free_and_takes_nothing():
    a = PageAllocator(4)
    a.allocate(2)
    with pytest.raises(OutOfPages, match="asked for 2 pages, 1 free"):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocation must not leak a partial one


def test_freed_pages_are_reused_last_in_first_out():
    a = PageAllocator(8)
    a.allocate(4)  # pages 1..4
    a.release(2)
    a.release(4)
    # 4 was freed last, so it comes back first, then 2, then the never-used 5.
    assert a.allocate(3) == [4, 2, 5]


def test_shared_page_is_freed_only_when_the_last_holder_releases():
    a = PageAllocator(4)
    (p,) = a.allocate(1)
    a.hold(p)
    a.hold(p)
    assert a.refcount[p] == 3
    a.release(p)
    a.release(p)
    assert a.refcount[p] == 1 and a.num_free == 2
    a.release(p)
    assert a.refcount[p] == 0 and a.num_free == 3


def test_release_with_keep_leaves_the_page_out_of_the_free_list():
    # The prefix cache keeps a page it indexes: unheld, but not free until evicted.
    a = PageAllocator(4)
    (p,) = a.allocate(1)
    a.release(p, keep=True)
    assert a.refcount[p] == 0 and a.num_free == 2
    assert p not in a.allocate(2)
    a.free_unheld(p)
    assert a.allocate(1) == [p]


def test_keep_only_matters_for_the_last_hold():
    a = PageAllocator(4)
    (p,) = a.allocate(1)
    a.hold(p)
    a.release(p, keep=True)
    a.release(p)  # the last holder does not keep it: it is free again
    assert a.num_free == 3


def test_releasing_an_unheld_page_is_an_error():
    a = PageAllocator(4)
    (p,) = a.allocate(1)
    a.release(p)
    with pytest.raises(AssertionError, match=f"page {p} released more often than held"):
        a.release(p)
    assert a.num_free == 3  # the bad release did not push the page onto the free list twice


def test_free_unheld_refuses_a_held_page():
    a = PageAllocator(4)
    (p,) = a.allocate(1)
    with pytest.raises(AssertionError, match=f"page {p} is still held 1 times"):
        a.free_unheld(p)


def test_refcount_is_an_int32_array_over_the_whole_pool():
    a = PageAllocator(7)
    assert a.refcount.shape == (7,) and a.refcount.dtype == np.int32
