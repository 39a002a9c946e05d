"""Transports: each module satisfies the Link contract of ``base.py`` (pipe, fifo, sysv, shm, memory)."""
