from __future__ import annotations

import torch

device = torch.device("cpu")
dtype = torch.float32
