"""Benchmarks for ipcbus: ``make bench`` / ``python -m ipcbus.bench``.

- :mod:`ipcbus.bench.runner`: plans the measurements, runs each in fresh
  processes, prints the tables (``cli`` is the click command).
- :mod:`ipcbus.bench.workloads`: the drivers and peers that run in those
  processes, the ipcbus rows, and the registry of implementations.
- :mod:`ipcbus.bench.baselines`: os.pipe, multiprocessing.Pipe, asyncio+uvloop
  Unix sockets, ProcessPoolExecutor, pyzmq and NATS.

Nothing here is imported by ``ipcbus`` itself; benchmarks never run in tests.
"""
