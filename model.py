"""Encoders: video (B, 3, T, H, W) and audio (B, 1, F, S) -> L2-normalised embeddings v, a (B, 128).

Paper scale (METHOD.md, from AVID): R(2+1)D-18 video encoder (torchvision), a 2-D conv net on the
log spectrogram (7x7 stride-2 stem, four blocks of two 3x3 convs, 64-128-256-512, global max pool),
MLP heads 512 -> 512 -> 128. `small` versions of both run the method on a laptop CPU.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.video import r2plus1d_18


def conv2plus1d(c_in, c_out, spatial_stride=1, temporal_stride=1):
    """A (2+1)D convolution: 1x3x3 over space, then 3x1x1 over time, each with BN + ReLU."""
    mid = (c_in + c_out) // 2
    return nn.Sequential(
        nn.Conv3d(c_in, mid, (1, 3, 3), (1, spatial_stride, spatial_stride), (0, 1, 1), bias=False),
        nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
        nn.Conv3d(mid, c_out, (3, 1, 1), (temporal_stride, 1, 1), (1, 0, 0), bias=False),
        nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


class SmallVideoEncoder(nn.Module):
    """Four (2+1)D layers, 32-64-128-128 channels; 32x32 input -> a 4x4 map at the last layer."""
    dim = 128

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(conv2plus1d(3, 32, 2), conv2plus1d(32, 64, 2, 2),
                                    conv2plus1d(64, 128, 2, 2), conv2plus1d(128, 128))

    def feature_map(self, x):      # (B, 3, T, H, W) -> (B, 128, T/4, H/8, W/8)
        return self.layers(x)


class R2Plus1DEncoder(nn.Module):
    """torchvision's R(2+1)D-18 without its classifier (random init: this is self-supervised)."""
    dim = 512

    def __init__(self):
        super().__init__()
        net = r2plus1d_18(weights=None)
        self.body = nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4)

    def feature_map(self, x):      # (B, 3, 8, 112, 112) -> (B, 512, 1, 7, 7)
        return self.body(x)


def conv_bn_relu(c_in, c_out, kernel, stride):
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class SmallAudioEncoder(nn.Module):
    """Three stride-2 3x3 convs, 32-64-128 channels, global max pool over frequency and time."""
    dim = 128

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for c_out in (32, 64, 128):
            layers += conv_bn_relu(c, c_out, 3, 2)
            c = c_out
        self.body = nn.Sequential(*layers)

    def forward(self, x):          # (B, 1, F, S) -> (B, 128)
        return self.body(x).amax(dim=(2, 3))


class AVIDAudioEncoder(nn.Module):
    """AVID's audio net: a 7x7 stride-2 stem, four blocks of two 3x3 convs (64-128-256-512
    channels), global max pool."""
    dim = 512

    def __init__(self):
        super().__init__()
        def block(c_in, c_out, stride):
            return conv_bn_relu(c_in, c_out, 3, stride) + conv_bn_relu(c_out, c_out, 3, 1)
        self.body = nn.Sequential(*conv_bn_relu(1, 64, 7, 2), *block(64, 64, 1), *block(64, 128, 2),
                                  *block(128, 256, 2), *block(256, 512, 2))

    def forward(self, x):          # (B, 1, F, S) -> (B, 512)
        return self.body(x).amax(dim=(2, 3))


VIDEO_ENCODERS = {"small": SmallVideoEncoder, "r2plus1d_18": R2Plus1DEncoder}
AUDIO_ENCODERS = {"small": SmallAudioEncoder, "avid": AVIDAudioEncoder}


def projection_head(c_in, hidden, out=128, centred=True):
    """MLP c_in -> hidden -> out. centred: a BatchNorm without parameters at the end, so that the
    embeddings of a batch are centred before they are L2-normalised. A randomly initialised encoder
    maps every clip to nearly the same direction (its ReLU features are all positive), where xID's
    softmax over K+1 candidates is flat; centred, the embeddings start spread (a deviation from
    the paper: METHOD.md)."""
    layers = [nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out, affine=False)] if centred else []))


class AVModel(nn.Module):
    """Video and audio encoders with projection heads; the embeddings the losses compare."""

    def __init__(self, video_arch="small", audio_arch="small", dim=128, centred_heads=True):
        super().__init__()
        if video_arch not in VIDEO_ENCODERS:
            raise ValueError(f"--video-arch must be one of {list(VIDEO_ENCODERS)}, "
                             f"got {video_arch!r}")
        if audio_arch not in AUDIO_ENCODERS:
            raise ValueError(f"--audio-arch must be one of {list(AUDIO_ENCODERS)}, "
                             f"got {audio_arch!r}")
        self.video_arch, self.audio_arch = video_arch, audio_arch
        self.video = VIDEO_ENCODERS[video_arch]()
        self.audio = AUDIO_ENCODERS[audio_arch]()
        self.video_head = projection_head(self.video.dim, self.video.dim, dim, centred_heads)
        self.audio_head = projection_head(self.audio.dim, self.audio.dim, dim, centred_heads)
        self.video_format = torch.contiguous_format

    def use_channels_last(self):
        """The video encoder's weights and inputs in the channels-last 3-D layout (N, T, H, W, C in
        memory), the one cuDNN's fastest bf16 convolutions read. What is computed does not change
        (the last digits may, as with any change of kernel)."""
        self.video_format = torch.channels_last_3d
        self.video.to(memory_format=self.video_format)
        return self

    def video_features(self, video):
        """Features for evaluation, from the last layer's map (B, C, T', H', W'): "pooled" (B, C),
        the global average, and "map" (B, C*16), pooled to 1x4x4 and flattened (the supplement's
        4x4x512 map at paper scale)."""
        fmap = self.video.feature_map(video.contiguous(memory_format=self.video_format))
        return {"pooled": fmap.mean(dim=(2, 3, 4)),
                "map": F.adaptive_avg_pool3d(fmap, (1, 4, 4)).flatten(1)}

    def forward(self, video, audio):
        video = video.contiguous(memory_format=self.video_format)
        pooled = self.video.feature_map(video).mean(dim=(2, 3, 4))          # (B, C)
        v = F.normalize(self.video_head(pooled), dim=1)                     # (B, 128)
        a = F.normalize(self.audio_head(self.audio(audio)), dim=1)          # (B, 128)
        return v, a
