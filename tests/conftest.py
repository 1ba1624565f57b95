"""Suite-wide settings. Tests use tiny models, where a second intra-op thread only adds
synchronisation: on a loaded 2-core machine it made a training step ten times slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the servers and workers tests start
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
