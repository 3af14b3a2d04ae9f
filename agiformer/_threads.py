"""Imported first by every command-line module, before torch.

OpenMP threads that spin while waiting stall every parallel region when the cores are shared with
other work: on a busy 2-core machine a training step measured 10x slower with 2 spinning threads
than with 1, and equal with waiting threads that sleep. So the commands default to sleeping
(OMP_WAIT_POLICY=PASSIVE) unless the environment already says otherwise.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
