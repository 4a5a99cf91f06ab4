import ctypes
import platform
import sys

import pytest

from skdfm._imaging import allocator as _allocator

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(_allocator, "_applied", None)


@pytest.mark.skipif(not glibc, reason="needs glibc")
def test_applies_once_on_glibc(monkeypatch):
    monkeypatch.delenv("SKDFM_KEEP_FREED_MEMORY", raising=False)
    loaded = []
    real = ctypes.CDLL

    def counting(*args, **kwargs):  # every application loads libc to call mallopt
        loaded.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_allocator.ctypes, "CDLL", counting)
    assert _allocator.keep_freed_memory() is True
    assert len(loaded) == 1
    assert _allocator.keep_freed_memory() is True
    assert _allocator.keep_freed_memory() is True
    assert len(loaded) == 1  # cached: not applied again
    assert _allocator.keep_freed_memory(force=True) is True
    assert len(loaded) == 2  # force does apply again


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("SKDFM_KEEP_FREED_MEMORY", "0")
    assert _allocator.keep_freed_memory() is False
    assert _allocator.keep_freed_memory() is False


def test_no_op_off_linux(monkeypatch):
    monkeypatch.delenv("SKDFM_KEEP_FREED_MEMORY", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _allocator.keep_freed_memory() is False
