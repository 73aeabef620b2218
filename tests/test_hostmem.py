"""keep_freed_memory: allocations up to 32 MB come from the heap and stay there when freed."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, json, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20

    def allocate_and_free():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)  # touch it: its pages are faulted in
        mapped = libc.mallinfo2().hblkhd >= size
        libc.free(p)
        return {"mapped": mapped, "kept_after_free": libc.mallinfo2().keepcost >= size}

    before = allocate_and_free()  # glibc's defaults: a fresh mapping, unmapped on free
    sys.path.insert(0, sys.argv[1])
    from spon_exp.hostmem import keep_freed_memory
    print(json.dumps({"before": before, "set": keep_freed_memory(), "after": allocate_and_free(),
                      "again": allocate_and_free()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_large_temporaries_from_the_heap_and_keeps_them(tmp_path):
    import ctypes
    import json
    from pathlib import Path

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings of the user's
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SCRIPT, root], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["before"] == {"mapped": True, "kept_after_free": False}  # the control: glibc's defaults
    assert report["set"] is True
    assert report["after"] == {"mapped": False, "kept_after_free": True}
    assert report["again"] == {"mapped": False, "kept_after_free": True}


def test_keep_freed_memory_leaves_a_users_own_settings(monkeypatch):
    from spon_exp.hostmem import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
