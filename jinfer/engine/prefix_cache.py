"""Prefix caching at page granularity (RadixAttention's idea, on full pages of KV).

A full page of KV is identified by its tokens and by the page before it: the key of page i is
(node id of page i-1, the page_size token ids of page i), so two requests share page i only if their
whole token prefix up to the end of page i is equal. Keys are exact tuples, never hashes, so a
collision cannot hand a request another prompt's KV. Cached pages nobody holds sit in an LRU list and
are evicted (children before parents, since requests release their pages last-first) when the pool
runs short.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from jinfer.engine.kv_pages import PageAllocator

ROOT = 0


@dataclasses.dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens that looked for a cached prefix
    hit_tokens: int = 0  # of those, tokens whose KV came from the cache


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self._node_of_key: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of_page: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._node_of_page: dict[int, int] = {}
        self._page_of_node: dict[int, int] = {}
        self._next_node = ROOT + 1
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # pages held by nobody
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._key_of_page)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def match(self, tokens: Sequence[int], max_pages: int) -> list[int]:
        """Pages holding the longest cached prefix of `tokens` (at most `max_pages`), now held by the caller."""
        ps = self.page_size
        pages, parent = [], ROOT
        for i in range(min(max_pages, len(tokens) // ps)):
            node = self._node_of_key.get((parent, tuple(tokens[i * ps:(i + 1) * ps])))
            if node is None:
                break
            page = self._page_of_node[node]
            pages.append(page)
            parent = node
        for page in pages:
            self._evictable.pop(page, None)
            self.allocator.hold(page)
        return pages

    def record_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.stats.queried_tokens += prompt_tokens
        self.stats.hit_tokens += hit_tokens

    def insert(self, tokens: Sequence[int], pages: Sequence[int], num_full_pages: int) -> None:
        """Indexes the first `num_full_pages` pages of a sequence whose KV is computed for `tokens`."""
        ps = self.page_size
        parent = ROOT
        for i in range(num_full_pages):
            key = (parent, tuple(tokens[i * ps:(i + 1) * ps]))
            node = self._node_of_key.get(key)
            page = pages[i]
            if node is None:
                if page in self._key_of_page:  # already indexed under another key: cannot happen for a
                    break  # page computed from these tokens, but never index a page twice
                node = self._next_node
                self._next_node += 1
                self._node_of_key[key] = node
                self._key_of_page[page] = key
                self._node_of_page[page] = node
                self._page_of_node[node] = page
            # Otherwise the key is indexed already: by this very page, or by a page someone else computed
            # first, in which case ours stays private; either way the descendants hang under that node.
            parent = node

    def release(self, page: int) -> None:
        """A request drops its hold on `page`; a cached page nobody holds becomes evictable, not free."""
        cached = page in self._key_of_page
        self.allocator.release(page, keep=cached)
        if cached and self.allocator.refcount[page] == 0:
            self._evictable[page] = None

    def evict(self, n: int) -> int:
        """Frees up to `n` least recently used unheld cached pages; returns how many were freed."""
        freed = 0
        while freed < n and self._evictable:
            page, _ = self._evictable.popitem(last=False)
            key = self._key_of_page.pop(page)
            node = self._node_of_page.pop(page)
            del self._node_of_key[key], self._page_of_node[node]
            self.allocator.free_unheld(page)
            freed += 1
        return freed
