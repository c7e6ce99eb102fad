"""The page allocator (serving/pages.py) under a hypothesis state machine of arrivals (with shared
prompt prefixes and n > 1 choices sharing pages), decode growth with copy-on-write, completions,
cancellations and preemptions of the newest request when pages run out, as the scheduler drives it:
no page is leaked or freed twice, and every reference count is back to zero when nothing runs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from realizar_jax.serving.pages import PagePool, page_keys

PS, SLOTS, MAX_PAGES = 4, 6, 8
PREFIXES = [list(range(100, 112)), list(range(200, 209)), []]   # shared "system prompts"


class Pool(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = PagePool(pages=20, page_size=PS, slots=SLOTS, max_pages=MAX_PAGES)
        self.running: dict[int, list[list[int]]] = {}   # request -> [slot, length] per choice
        self.queue: list[tuple[int, list[int], int]] = []
        self.next_id = 0
        self.preemptions = 0

    def _free_slots(self):
        used = {c[0] for cs in self.running.values() for c in cs}
        return [s for s in range(SLOTS) if s not in used]

    def _release(self, rid):
        for slot, _ in self.running.pop(rid):
            self.pool.release(slot)

    @rule(prefix=st.sampled_from(range(len(PREFIXES))), tail=st.lists(st.integers(0, 50), min_size=1, max_size=9),
          n=st.integers(1, 2))
    def arrive(self, prefix, tail, n):
        self.queue.append((self.next_id, PREFIXES[prefix] + tail, n))
        self.next_id += 1

    @precondition(lambda self: self.queue)
    @rule()
    def admit(self):
        rid, ids, n = self.queue[0]
        free = self._free_slots()
        if len(free) < n:
            return
        keys = page_keys(ids, PS, b"model")
        hits = self.pool.match(keys)[:(len(ids) - 1) // PS]
        placed = []
        for i, slot in zip(range(n), free):
            if placed and not hits:   # n > 1 without a cached prefix: the first choice's pages, shared
                shared = [int(p) for p in self.pool.tables[placed[0], :self.pool.held[placed[0]]]]
            else:
                shared = hits
            if not self.pool.assign(slot, shared, len(ids)):
                for s in placed:
                    self.pool.release(s)
                return
            placed.append(slot)
        self.queue.pop(0)
        for slot in placed:   # the prompt's full pages, written: cached for later prompts
            for i in range(len(ids) // PS):
                self.pool.register(slot, i, keys[i])
        self.running[rid] = [[s, len(ids)] for s in placed]

    @precondition(lambda self: self.running)
    @rule(k=st.integers(1, 3))
    def decode_chunk(self, k):
        """Each choice, oldest request first, gets pages for k more positions and owns the page it writes."""
        for rid in sorted(self.running):
            for choice in list(self.running.get(rid, [])):
                while rid in self.running:
                    slot, length = choice
                    end = min(length + k, MAX_PAGES * PS)
                    ok = self.pool.grow(slot, end)
                    for index in range(length // PS, -(-end // PS)) if ok and end > length else ():
                        if self.pool.writable(slot, index) is False:
                            ok = False
                            break
                    if ok:
                        choice[1] = end
                        break
                    newest = max(self.running)
                    self.queue.insert(0, (newest, [1] * self.running[newest][0][1], len(self.running[newest])))
                    self._release(newest)
                    self.preemptions += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish_or_cancel(self, data):
        self._release(data.draw(st.sampled_from(sorted(self.running))))

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def cancel_queued(self, data):
        self.queue.pop(data.draw(st.integers(0, len(self.queue) - 1)))

    @invariant()
    def books_balance(self):
        self.pool.check()
        held = sum(len(cs) for cs in self.running.values())
        assert (self.pool.in_use == 0) == (held == 0)
        if not self.running:
            assert not self.pool.refs.any(), "a reference count is not zero with nothing running"
            assert self.pool.available == self.pool.usable

    def teardown(self):
        for rid in list(self.running):
            self._release(rid)
        self.pool.check()
        assert not self.pool.refs.any() and self.pool.in_use == 0


TestPagePool = Pool.TestCase
TestPagePool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_keys_chain_and_cache_lru_evicts_unheld_pages_only():
    pool = PagePool(pages=4, page_size=2, slots=2, max_pages=4)   # 3 usable pages
    a = [1, 2, 3, 4, 5]
    keys = page_keys(a, 2, b"m")
    assert len(keys) == 2 and keys != page_keys(a, 2, b"other model")
    assert page_keys([9, 9, 3, 4], 2, b"m")[1] != keys[1]   # a key names the whole prefix, not one page
    assert pool.assign(0, [], 5)
    pool.register(0, 0, keys[0])
    pool.register(0, 1, keys[1])
    first = [int(p) for p in pool.tables[0, :2]]
    pool.release(0)
    assert pool.available == 3 and pool.cached == 2 and pool.match(keys) == first
    assert pool.assign(1, pool.match(keys)[:1], 3)   # reuses page 0 of the prefix, takes a fresh one
    assert pool.tables[1, 0] == first[0] and pool.refs[first[0]] == 1
    assert pool.grow(1, 6)           # needs the last page: evicts the cached, unheld one
    assert pool.match(keys) == first[:1] and pool.cached == 1
    assert not pool.grow(1, 8) and pool.held[1] == 3   # all or nothing
    with pytest.raises(ValueError, match="at most 4"):
        pool.assign(0, [], 9)
    pool.release(1)
    pool.check()
    assert not pool.refs.any()


def test_copy_on_write_of_a_shared_page():
    pool = PagePool(pages=5, page_size=4, slots=2, max_pages=2)
    assert pool.assign(0, [], 6)
    assert pool.assign(1, [int(p) for p in pool.tables[0, :2]], 6)   # n = 2: the same two pages
    shared = int(pool.tables[0, 1])
    src, dst = pool.writable(0, 1)
    assert src == shared and pool.tables[0, 1] == dst != shared and pool.refs[shared] == 1
    assert pool.writable(1, 1) is None   # the last holder writes in place
    pool.release(0)
    pool.release(1)
    pool.check()
    assert np.all(pool.refs == 0)
