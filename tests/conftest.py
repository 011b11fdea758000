# Tests import the top-level modules (model.py, pack.py, ...) from the repository root, on the CPU, in a few threads.
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
