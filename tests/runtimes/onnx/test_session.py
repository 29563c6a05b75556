"""The onnxruntime session helpers: glibc keeps large buffers mapped, so freed ones go back to the system
(why: `map_large_buffers`). The KV handling of DecoderSession is tested in test_runtime.py."""

import ctypes
import subprocess
import sys

import pytest

from tests.support import ROOT

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc's malloc (Linux, glibc 2.33 or later)",
)

# in a fresh process: is a 20 MiB block mapped on its own after a 30 MiB one was freed?
PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
MallInfo2 = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "mapped":
    from runtimes.onnx.session import map_large_buffers
    assert map_large_buffers()
libc.free(libc.malloc(30 << 20))  # glibc's default raises its mmap threshold to a mapped block freed
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd - before >= 20 << 20)
"""


def mapped_after_a_larger_free(mode: str) -> bool:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_large_buffers_stay_mapped_once_sessions_are_opened():
    assert not mapped_after_a_larger_free("default")  # glibc alone: the 20 MiB block comes from the heap
    assert mapped_after_a_larger_free("mapped")
