"""Host-side bookkeeping of the paged KV cache: which pages are free and who holds each page.

Pages are indices into the device arrays `k_pages, v_pages: [L, K, P, page_size, H]` (layers, KV heads,
pages, page_size, head dim). A page is held by every request whose page table lists it (prefix sharing
makes that more than one) and, separately, may be remembered by the prefix cache; it returns to the free
list only when neither holds it.
Page 0 is never handed out: page tables pad with it, and padded tokens write into it.
"""

from __future__ import annotations

import numpy as np


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be at least 2 (page 0 is reserved)")
        self.num_pages = num_pages
        self.refcount = np.zeros(num_pages, np.int32)  # i32[P]: requests holding each page
        # LIFO free list: recently freed pages are reused first (they may still be warm in caches).
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self.refcount[pages] = 1
        return pages

    def hold(self, page: int) -> None:
        """Another request starts sharing `page` (or the prefix cache revives it)."""
        self.refcount[page] += 1

    def release(self, page: int, keep: bool = False) -> None:
        """Drops one hold; at zero the page is freed unless `keep` (the prefix cache still indexes it)."""
        if self.refcount[page] <= 0:
            raise AssertionError(f"page {page} released more often than held")
        self.refcount[page] -= 1
        if self.refcount[page] == 0 and not keep:
            self._free.append(page)

    def free_unheld(self, page: int) -> None:
        """Returns a page that no request holds (an evicted prefix-cache page) to the free list."""
        assert self.refcount[page] == 0, f"page {page} is still held {self.refcount[page]} times"
        self._free.append(page)
