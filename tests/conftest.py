"""Shared pytest setup: make the flat modules at the repository root importable, keep runs small."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests use tiny tensors, where a second thread costs more in hand-offs than it gains.
torch.set_num_threads(1)
# The reference libraries must never try to reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
