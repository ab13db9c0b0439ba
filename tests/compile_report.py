"""`pytest --compile-report`: the seconds each test spent compiling Numba kernels, and each
kernel's, in the terminal summary; what to look at before changing compile_ahead.py. Only
compiles in the suite's own process count (not compile_ahead.py's, nor early_python children's)."""

from __future__ import annotations

import collections
import time

from numba.core import event

SHOWN = 25


class CompileReport(event.Listener):
    """A Numba compile listener: a kernel's compile that no other encloses is timed whole
    (the kernels it calls compile inside it) and charged to the test running."""

    def __init__(self):
        self.test = "(collection)"
        self.depth = 0
        self.started = 0.0
        self.by_test = collections.Counter()
        self.by_kernel = collections.Counter()
        self.signatures = collections.Counter()

    def on_start(self, ev):
        self.depth += 1
        if self.depth == 1:
            self.started = time.perf_counter()

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            func = ev.data["dispatcher"].py_func
            seconds = time.perf_counter() - self.started
            name = f"{func.__module__}.{func.__qualname__}"
            self.by_test[self.test] += seconds
            self.by_kernel[name] += seconds
            self.signatures[name] += 1

    def pytest_runtest_logstart(self, nodeid, location):
        self.test = nodeid

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        terminalreporter.section("Numba compile time")
        write(f"{sum(self.by_test.values()):.1f} s in {sum(self.signatures.values())} compiles")
        for name, seconds in self.by_kernel.most_common(SHOWN):
            write(f"{seconds:8.1f} s {self.signatures[name]:4d}x  {name}")
        for test, seconds in self.by_test.most_common(SHOWN):
            write(f"{seconds:8.1f} s  {test}")


def install(config) -> None:
    report = CompileReport()
    event.register("numba:compile", report)
    config.pluginmanager.register(report, "compile-report")
