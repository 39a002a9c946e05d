"""The public surface: every exported name exists, is documented, and typed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import ipcbus

API_PAGE = (Path(__file__).parent.parent / "docs" / "api.md").read_text()


def test_all_names_exist_and_are_documented() -> None:
    assert len(set(ipcbus.__all__)) == len(ipcbus.__all__), "duplicate names in __all__"
    for name in ipcbus.__all__:
        obj = getattr(ipcbus, name)
        if name.isupper() or name.startswith("__"):
            continue
        if typing.get_origin(obj) is typing.Literal:
            # A type alias carries no __doc__ at run time: its docstring is the
            # string after it in the source, and the API page names it.
            assert f"`{name}`" in API_PAGE, f"ipcbus.{name} is not in docs/api.md"
            continue
        assert inspect.getdoc(obj), f"ipcbus.{name} has no docstring"


def test_public_methods_of_exported_classes_are_documented() -> None:
    missing = []
    for name in ipcbus.__all__:
        obj = getattr(ipcbus, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(value, property)):
                continue
            if not inspect.getdoc(value):
                missing.append(f"{name}.{attr}")
    assert not missing, f"undocumented public methods: {missing}"


def test_every_module_has_a_docstring_and_imports() -> None:
    for info in pkgutil.walk_packages(ipcbus.__path__, "ipcbus."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        assert inspect.getdoc(mod), f"module {info.name} has no docstring"


def test_package_is_typed() -> None:
    assert (Path(ipcbus.__file__).parent / "py.typed").is_file()


def test_no_pickle_anywhere() -> None:
    root = Path(ipcbus.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path


def test_host_lock_is_held_around_each_test() -> None:
    # The suite's leak check runs under ipcbus.testing.host_lock, as does each
    # benchmark measurement: while this test runs, no other process gets it.
    code = (
        "import fcntl, os, tempfile\n"
        "fd = os.open(os.path.join(tempfile.gettempdir(), 'ipcbus-tests.lock'), os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    )
    held = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert held.returncode != 0 and b"BlockingIOError" in held.stderr


def mypy_strict(path: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on one file, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(ipcbus.__file__).parent.parent,
    )


def test_typed_user_code_passes_mypy_strict() -> None:
    """What the API's annotations give a strictly typed user (tests/typed_usage.py)."""
    res = mypy_strict(Path(__file__).with_name("typed_usage.py"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_catches_mistakes_in_typed_user_code(tmp_path: Path) -> None:
    """The annotations are precise enough to catch real mistakes: a payload
    decoded as ``int | None`` used as an ``int``, and a typo in a lambda
    handler (which is given the Msg)."""
    wrong = tmp_path / "wrong_usage.py"
    wrong.write_text(
        "import ipcbus\n"
        "async def f(bus: ipcbus.Bus, msg: ipcbus.Msg) -> None:\n"
        "    n: int = msg.decode(int | None)\n"
        "    await bus.serve('s', lambda m: m.dtaa)\n"
    )
    res = mypy_strict(wrong)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert 'wrong_usage.py:3: error: Incompatible types in assignment (expression has type "int | None"' in (
        out
    )
    assert 'wrong_usage.py:4: error: "Msg" has no attribute "dtaa"' in out
