"""``python -m ipcbus.bench``: run the benchmark tables (see :mod:`ipcbus.bench.runner`)."""

from ipcbus.bench.runner import main

if __name__ == "__main__":
    main()
