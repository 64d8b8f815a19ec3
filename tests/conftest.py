"""Suite-wide settings: tiny models train far faster on one thread than on a contended pool."""

import torch

torch.set_num_threads(1)
