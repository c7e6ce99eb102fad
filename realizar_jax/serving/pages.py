"""The host side of the paged KV cache: which pages each slot holds, who shares them, and which full
pages are cached for reuse by a later prompt with the same prefix.

The device holds the pools and the block tables (cache.PagedKVCache); this allocator only decides, on
the host, which page ids go where, and the scheduler sends the tables with the next device call: no
allocation ever changes a shape, so nothing recompiles.

- Page 0 is the null page (cache.NULL_PAGE): never handed out; table entries of nothing point at it.
- Every other page is free, held (reference count > 0: in some slot's table), or cached-unheld (its
  tokens are in the prefix index and no slot holds it: reusable on a hit, evicted least recently
  released first when a fresh page is needed).
- A full page of prompt tokens is keyed by a chained hash: its tokens, the previous page's key and,
  at the root, the model's identity, so a key names the whole prefix up to the page's end.
- A page that is shared (held twice) or cached is never written: `writable` copies it to a fresh page
  first (copy on write) and hands back the copy to make on the device.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np

from ..cache import NULL_PAGE, pages_for


def page_keys(tokens, page_size: int, identity: bytes, limit: int | None = None) -> list[bytes]:
    """The chained keys of the full pages of `tokens` (at most `limit` of them)."""
    keys, parent = [], hashlib.blake2b(identity, digest_size=16).digest()
    full = len(tokens) // page_size if limit is None else min(limit, len(tokens) // page_size)
    for p in range(full):
        chunk = np.asarray(tokens[p * page_size:(p + 1) * page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


class PagePool:
    """Page ids 1..pages-1 over `slots` block tables of max_pages entries each. prefix_cache=False:
    pages are never cached (a released page is free at once) and `match` finds nothing."""

    def __init__(self, pages: int, page_size: int, slots: int, max_pages: int, prefix_cache: bool = True):
        if pages < 2:
            raise ValueError(f"the page pool needs at least 2 pages (the null page and one more), got {pages}")
        self.pages, self.page_size, self.slots, self.max_pages = pages, page_size, slots, max_pages
        self.prefix_cache = prefix_cache
        self.tables = np.full((slots, max_pages), NULL_PAGE, np.int32)
        self.held = [0] * slots                        # pages in each slot's table (a prefix of it)
        self.refs = np.zeros((pages,), np.int32)
        self._free = collections.deque(range(1, pages))
        self._key_of: dict[int, bytes] = {}            # cached page -> its key
        self._page_of: dict[bytes, int] = {}           # key -> cached page
        self._unheld: collections.OrderedDict[int, None] = collections.OrderedDict()   # cached, refs 0: LRU first
        self.dirty = True                              # tables changed since the device last got them

    # ---- queries ----
    @property
    def usable(self) -> int:
        """Pages a sequence can ever hold: all but the null page."""
        return self.pages - 1

    @property
    def in_use(self) -> int:
        """Pages held by some slot."""
        return self.usable - len(self._free) - len(self._unheld)

    @property
    def available(self) -> int:
        """Pages a fresh allocation can get now (free, or cached and unheld: evictable)."""
        return len(self._free) + len(self._unheld)

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys` (page keys of a prompt)."""
        out = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            out.append(page)
        return out

    # ---- changes ----
    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        page, _ = self._unheld.popitem(last=False)   # evict the least recently released cached page
        del self._page_of[self._key_of.pop(page)]
        return page

    def _hold(self, page: int) -> None:
        if self.refs[page] == 0:
            self._unheld.pop(page, None)
        self.refs[page] += 1

    def _drop(self, page: int) -> None:
        if self.refs[page] <= 0:
            raise RuntimeError(f"page {page} released more often than held")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self._key_of:
                self._unheld[page] = None      # most recently released: evicted last
            else:
                self._free.append(page)

    def assign(self, slot: int, shared: list[int], positions: int) -> bool:
        """Give an empty slot the pages `shared` (held by others or cached: from match() or another slot's
        table) followed by fresh pages up to `positions` positions. All or nothing: False (and no change)
        when there are not enough pages."""
        if self.held[slot]:
            raise RuntimeError(f"slot {slot} already holds {self.held[slot]} pages")
        need = pages_for(positions, self.page_size)
        if need > self.max_pages:
            raise ValueError(f"{positions} positions need {need} pages; a sequence holds at most {self.max_pages}")
        shared = shared[:need]
        unheld_shared = sum(1 for p in shared if self.refs[p] == 0)
        if need - len(shared) > self.available - unheld_shared:
            return False
        for p in shared:
            self._hold(p)
        fresh = [self._take() for _ in range(need - len(shared))]
        for p in fresh:
            self._hold(p)
        self.tables[slot, :need] = shared + fresh
        self.held[slot] = need
        self.dirty = True
        return True

    def grow(self, slot: int, positions: int) -> bool:
        """Fresh pages for `slot` up to `positions` positions (capped at max_pages); False (no change)
        when there are not enough."""
        need = min(pages_for(positions, self.page_size), self.max_pages) - self.held[slot]
        if need <= 0:
            return True
        if need > self.available:
            return False
        start = self.held[slot]
        for i in range(need):
            p = self._take()
            self._hold(p)
            self.tables[slot, start + i] = p
        self.held[slot] += need
        self.dirty = True
        return True

    def writable(self, slot: int, index: int) -> tuple[int, int] | None | bool:
        """Make entry `index` of slot's table a page only it holds, uncached, before a write into it.
        -> None (it was already), (src, dst) (the copy the device must make first), or False (no page
        for the copy)."""
        page = int(self.tables[slot, index])
        if page == NULL_PAGE or index >= self.held[slot]:
            raise RuntimeError(f"slot {slot} holds no page at table entry {index}")
        if self.refs[page] == 1 and page not in self._key_of:
            return None
        if not self.available:
            return False
        dst = self._take()
        self._hold(dst)
        self._drop(page)
        self.tables[slot, index] = dst
        self.dirty = True
        return page, dst

    def register(self, slot: int, index: int, key: bytes) -> None:
        """Cache slot's page at table entry `index` (full of the tokens `key` names) for later prompts;
        a no-op when prefix caching is off or that prefix is cached already."""
        if not self.prefix_cache or key in self._page_of:
            return
        page = int(self.tables[slot, index])
        if page in self._key_of:
            return
        self._key_of[page] = key
        self._page_of[key] = page

    def release(self, slot: int) -> None:
        """Drop every page of slot's table (cached ones stay cached, the rest are free)."""
        for p in self.tables[slot, :self.held[slot]]:
            self._drop(int(p))
        self.tables[slot] = NULL_PAGE
        self.held[slot] = 0
        self.dirty = True

    def check(self) -> None:
        """AssertionError unless the books balance: each page free, cached-unheld or held exactly as
        often as the tables name it."""
        counts = np.zeros((self.pages,), np.int64)
        for s in range(self.slots):
            row = self.tables[s]
            assert (row[self.held[s]:] == NULL_PAGE).all(), f"slot {s}: entries past its pages"
            assert (row[:self.held[s]] != NULL_PAGE).all(), f"slot {s}: a null page among its pages"
            np.add.at(counts, row[:self.held[s]], 1)
        assert (counts == self.refs).all(), "reference counts differ from the tables"
        free = set(self._free)
        assert len(free) == len(self._free) and NULL_PAGE not in free, "free list repeats a page or has the null page"
        assert not free & set(self._unheld), "a page both free and cached"
        assert all(self.refs[p] == 0 for p in free | set(self._unheld)), "a held page is free or unheld"
        assert set(self._unheld) <= set(self._key_of), "an unheld page that is not cached"
        assert {self._page_of[k] for k in self._key_of.values()} == set(self._key_of), "index out of step"
        held = {p for p in range(1, self.pages) if self.refs[p] > 0}
        assert held | free | set(self._unheld) == set(range(1, self.pages)), "a page is lost"
