"""Process settings for the command-line tools; imported first by each, before torch.

- OpenMP threads that spin while waiting stall every parallel region when the cores are shared with
  other work: on a busy 2-core machine a training step measured 10x slower with 2 spinning threads
  than with 1, and equal with threads that sleep. So the commands default to OMP_WAIT_POLICY=PASSIVE
  unless the environment already says otherwise.
- glibc serves a freed-then-reallocated tensor of up to 32 MB from its heap, where the pages stay
  resident: at L = 16384 bytes that kept about 650 MB more resident than the activations needed. A
  fixed 1 MB mmap threshold hands every larger tensor back to the OS when it is freed
  (AGIFORMER_MMAP_THRESHOLD overrides the size; 0 leaves glibc's default).
"""

import ctypes
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_threshold = int(os.environ.get("AGIFORMER_MMAP_THRESHOLD", 1 << 20))
if _threshold:
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, _threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
