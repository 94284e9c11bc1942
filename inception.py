"""The Inception-v3 network used by FID (pool3 features, 2048-d): torchvision's blocks with FID's three changes.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium", Sec. 4) compares Gaussians fitted to the 2048-d pool3 activations of the Inception-v3
network of Szegedy et al. 2016 ("Rethinking the Inception architecture", Fig. 5-7 and Table 1)
with the TensorFlow weights of 2015-12-05. Those TensorFlow graphs differ from torchvision's
Inception-v3 in three places, which pytorch-fid (mseitzer/pytorch-fid, `FIDInceptionA/C/E_1/E_2`)
reproduces and this file matches:
  1. the 3x3 average pool in the pool branch of the A, C and first E blocks ignores the zero
     padding (`count_include_pad=False`, TensorFlow's "SAME" average pool);
  2. the pool branch of the last E block (Mixed_7c) uses a 3x3 *max* pool;
  3. the classifier has 1008 outputs (not used here: pool3 comes before it).
Input: images in [0, 1], any size. They are resized to 299x299 bilinearly with
`align_corners=False` and no antialiasing (pytorch-fid's `F.interpolate` call), then scaled to
[-1, 1]. Output: the global average of the last 8x8x2048 map.

The blocks are torchvision's (BasicConv2d: conv without bias, BatchNorm eps 1e-3, ReLU; InceptionA..E of
Szegedy et al.'s Fig. 5-7), installed with open_clip; the three FID blocks override their forward, as pytorch-fid
does. Module names are torchvision's, so pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth` loads
without renaming. Left out: the auxiliary and the 1008-way classifiers (`fc.*` in the weight file, skipped), the
earlier feature blocks (64/192/768-d) that pytorch-fid can also return, and any download: the weights come from a
local file only.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from checkpoint import load_mapped, read_state_dict

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FEATURE_DIM = 2048


def avg_pool_same(x):
    """3x3 stride-1 average pool that averages only the pixels inside the image (TF 'SAME'): FID change 1."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1, the pool of FID change 1."""

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_same(x))], dim=1)


class FIDInceptionC(InceptionC):
    """17x17 block (Mixed_6b..6e), factorised 7x7 convolutions (1x7 then 7x1), the pool of FID change 1."""

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(avg_pool_same(x))], dim=1)


class FIDInceptionE(InceptionE):
    """8x8 block with split 1x3 / 3x1 outputs: pool="avg" (Mixed_7b, FID change 1), "max" (Mixed_7c, change 2)."""

    def __init__(self, in_ch, pool):
        super().__init__(in_ch)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def forward(self, x):
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        pooled = avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to pool3, as used by FID. forward(images in [0,1]) -> (B, 2048)."""

    def __init__(self):
        super().__init__()
        # stem: 299 -> 35x35x192
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        # 35x35
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        # 17x17
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        # 8x8
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def forward(self, images):
        # 1. resize to the network's 299x299 and scale [0, 1] -> [-1, 1]
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        # 2. stem
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # 3. Inception blocks
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        # 4. pool3: global average
        return x.mean(dim=(2, 3))  # (B,2048,8,8) -> (B,2048)


def load_fid_inception(path):
    """Build the FID Inception network and fill it from pytorch-fid's weight file at `path` (read by the disk
    layer: checkpoint.read_state_dict, torch.load with weights_only=True, then the audit; a broken file is a
    CheckpointError)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found at {path!r}. FID needs pytorch-fid's port of the TensorFlow "
            f"FID Inception weights ({FID_WEIGHTS_NAME}, 91 MB). Nothing is downloaded here: fetch it on a "
            f"machine with internet access from\n  {FID_WEIGHTS_URL}\nand pass it with "
            f"--inception-weights PATH (or use --features classifier --classifier DIR instead).")
    # the 1008-way classifier is not part of the pool3 feature network
    model = FIDInceptionV3()
    load_mapped(model, [(k, k, t) for k, t in read_state_dict(path).items() if not k.startswith("fc.")], [],
                f"FID Inception (pytorch-fid's {FID_WEIGHTS_NAME})", path,
                keep_init=lambda name: name.endswith("num_batches_tracked"))  # a BatchNorm counter, not a weight
    return model.eval().requires_grad_(False)
