"""Process settings for the command-line tools; imported first by each, before torch.

glibc serves a freed-then-reallocated tensor of up to 32 MB from its heap, where the pages stay
resident: at L = 16384 bytes that kept about 650 MB more resident than the activations needed. A
fixed 1 MB mmap threshold hands every larger tensor back to the OS when it is freed
(AGIFORMER_MMAP_THRESHOLD overrides the size; 0 leaves glibc's default).

OpenMP's wait policy is left alone: its default (spin, then sleep) made a default-model training step
1.6x and a batch-1 generation step several times faster than OMP_WAIT_POLICY=PASSIVE on an idle
2-core machine. On cores shared with other busy processes, PASSIVE can be the better choice.
"""

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_threshold = int(os.environ.get("AGIFORMER_MMAP_THRESHOLD", 1 << 20))
if _threshold:
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, _threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
