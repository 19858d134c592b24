"""Shared pytest setup: keep torch to one thread (2-core CI machines, fair timings)."""

import torch

torch.set_num_threads(1)
