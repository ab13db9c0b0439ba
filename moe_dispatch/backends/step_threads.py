"""How many threads a decode step runs on: all of Numba's, unless recent steps say that a core
is taken by another process.

A decode step is two short parallel regions. Where another process holds one of the cores,
each region waits for whichever of its threads the scheduler has set aside, up to a time
slice. On 2 cores with one kept busy, a T=1 step of olmoe-1b-7b x0.5 (bfloat16) took 9.2 ms
(median; 0.54 in the steps where no thread was set aside) on two threads, and 0.98 on the
calling thread alone, as on a quiet machine. So each kind of step remembers its fastest time
on all threads; SLOW times that, twice in a row, sends the following steps of that kind to
the calling thread alone. After ALONE of them one more tries all threads: fast, and the steps
go back to them; slow, and the next stretch alone is twice as long (up to LONGEST_ALONE).

A step counts as slow only where the calling thread spent OFF_CPU of it or more off the CPU
(waiting for a thread set aside, or set aside itself): a step whose weights come from memory
after one that found them in the cache is as slow on a quiet machine, but on the CPU all along.
Quiet, 2 cores, olmoe-1b-7b x0.5 T=1: 32 of 300 cache-warm bfloat16 steps took 3x their
fastest, none of them 25% off the CPU (where int8 steps alternated warm and cold, 128 of 411
had gone to the calling thread alone); with a core busy, 48-59 of 75-79 slow bfloat16 steps
were more than 25% off it.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, TypeVar

import numba

Result = TypeVar("Result")


class StepThreads:
    SLOW = 3.0  # a step this many times the fastest of its kind waited on a thread set aside
    OFF_CPU = 0.25  # if the calling thread was off the CPU for this share of it or more
    STRIKES = 2  # slow steps in a row before the steps run alone
    ALONE = 64  # steps alone before all threads are tried again
    LONGEST_ALONE = 1024

    def __init__(self) -> None:
        # kind -> [fastest seconds on all threads, slow steps in a row, steps left alone,
        #          the length of the last stretch alone]. Read and written under the backend's
        #          launch lock, which every step holds.
        self._kinds: dict[Hashable, list] = {}

    def alone(self, kind: Hashable) -> bool:
        """Whether the next step of this kind runs on the calling thread alone."""
        state = self._kinds.get(kind)
        if state is None or state[2] == 0:
            return False
        state[2] -= 1
        if state[2] == 0:  # the next step tries all threads; one slow step sends them back
            state[1] = self.STRIKES - 1
        return True

    def record(self, kind: Hashable, seconds: float, off_cpu: Callable[[], float]) -> None:
        """A step of this kind took seconds on all threads; off_cpu() gives the share of them
        the calling thread spent off the CPU (asked only of a step that took SLOW times the
        fastest: reading a thread's CPU time costs a system call)."""
        state = self._kinds.get(kind)
        if state is None:
            self._kinds[kind] = [seconds, 0, 0, 0]
            return
        if seconds < state[0]:
            state[0] = seconds
        if seconds <= self.SLOW * state[0] or off_cpu() < self.OFF_CPU:
            state[1], state[3] = 0, 0
            return
        state[1] += 1
        if state[1] >= self.STRIKES:
            state[3] = min(2 * state[3] or self.ALONE, self.LONGEST_ALONE)
            state[1], state[2] = 0, state[3]

    def run(self, kind: Hashable, step: Callable[[], Result], ran: Result) -> Result:
        """step() on the calling thread alone or on all threads, as this kind's steps run now;
        a step on all threads counts where it returns ran (one that declined early says nothing
        about the cores). Numba's count is read only for a step alone: reading it costs a
        small step 2% on cold caches."""
        if self.alone(kind):
            wanted = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                return step()
            finally:
                numba.set_num_threads(wanted)
        start, start_on_cpu = time.perf_counter(), time.thread_time()
        result = step()
        if result == ran:
            seconds = time.perf_counter() - start
            self.record(kind, seconds, lambda: 1 - (time.thread_time() - start_on_cpu) / seconds)
        return result


STEP_THREADS = StepThreads()
