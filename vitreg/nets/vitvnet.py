"""ViT-V-Net (Chen et al. 2021) exactly as published, with the official state-dict key names.

Module names follow the authors' code so their checkpoints load one to one; the only key of
theirs we do not have is the ``spatial_trans.grid`` buffer, since the sampling grid is built on
the fly for the input's size and device (see :mod:`vitreg.transform`).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vitreg.errors import VitregError
from vitreg.transform import integrate_velocity, warp

SIZE_MULTIPLE = 32  # /4 by the CNN encoder, /8 by the patch embedding
_ONEDNN = torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class VitVNetConfig:
    """Architecture of ViT-V-Net; the defaults are the published configuration.

    ``img_size`` is (D, H, W) in voxels and every entry must be a multiple of 32.
    ``int_steps`` 0 (published) makes the head's output the displacement; N > 0 makes it a
    stationary velocity integrated by N scaling-and-squaring steps (a diffeomorphic variant).
    """

    img_size: tuple[int, int, int] = (160, 192, 224)
    in_channels: int = 2
    encoder_channels: tuple[int, int, int] = (16, 32, 32)
    down_num: int = 2
    patch_size: int = 8
    hidden_size: int = 252
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    conv_first_channel: int = 512
    decoder_channels: tuple[int, ...] = (96, 48, 32, 32, 16)
    skip_channels: tuple[int, ...] = field(default=(32, 32, 32, 32, 16))
    flow_init_std: float = 1e-5
    int_steps: int = 0

    def __post_init__(self) -> None:
        check_size(self.img_size)
        if self.int_steps < 0:
            raise VitregError(f"int_steps must be >= 0, got {self.int_steps}")
        if self.hidden_size % self.num_heads:
            raise VitregError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Token grid (D, H, W): the image size / 4 (CNN) / patch size."""
        return tuple(n // 4 // self.patch_size for n in self.img_size)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json_file(cls, path: str | Path) -> VitVNetConfig:
        """The published config with the fields a JSON object file names changed."""
        try:
            changes = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise VitregError(f"{path}: not a readable JSON file ({error})") from None
        if not isinstance(changes, dict):
            raise VitregError(f"{path}: expected a JSON object of config fields")
        try:
            return cls.from_dict({**cls().to_dict(), **changes})
        except (TypeError, VitregError) as error:
            raise VitregError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, values: dict) -> VitVNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise VitregError(f"unknown ViT-V-Net config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_size(img_size: tuple[int, ...]) -> None:
    """Raise VitregError unless ``img_size`` is three positive multiples of 32."""
    if len(img_size) != 3:
        raise VitregError(f"image size must have 3 entries (D, H, W), got {tuple(img_size)}")
    bad = [n for n in img_size if n <= 0 or n % SIZE_MULTIPLE]
    if bad:
        nearest = tuple(
            max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(n / SIZE_MULTIPLE)) for n in img_size
        )
        raise VitregError(
            f"image size {tuple(img_size)} is not divisible by {SIZE_MULTIPLE} on every axis; "
            f"the nearest valid size is {nearest}"
        )


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s BatchNorm running statistics on exit: the backward pass's
    recomputation of a checkpointed forward must not update them a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[buffer.clone() for buffer in norm.buffers(recurse=False)] for norm in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved, strict=True):
                for buffer, value in zip(norm.buffers(recurse=False), buffers, strict=True):
                    buffer.copy_(value)


def _run(module: nn.Module, *inputs: torch.Tensor | None, checkpoint: bool) -> torch.Tensor:
    """``module(*inputs)``, under activation checkpointing when asked and autograd is on.

    The recomputation replays the forward's RNG state (the same dropout masks) and leaves
    BatchNorm's running statistics as the forward left them, so a checkpointed training step
    changes the model exactly as a plain one does.
    """
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            module,
            *inputs,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _batchnorm_statistics_kept(module)),
        )
    return module(*inputs)


class DoubleConv(nn.Module):
    """(Conv3d k3 + ReLU) x 2, with bias and no normalisation (the official CNN encoder)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, mid, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """MaxPool3d(2) then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class CNNEncoder(nn.Module):
    """Full, 1/2 and 1/4 resolution features plus ``down_num`` max-pooled copies of the 1/4 map.

    Returns the 1/4 map (B, C, D/4, H/4, W/4) and the skips, coarsest first.
    """

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        c = config.encoder_channels
        self.down_num = config.down_num
        self.inc = DoubleConv(config.in_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.from_full(_run(self.inc, x, checkpoint=self.checkpointing))

    def from_full(self, full: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The rest of the encoder from ``inc``'s output ``full`` (B, C0, D, H, W)."""
        half = _run(self.down1, full, checkpoint=self.checkpointing)
        quarter = _run(self.down2, half, checkpoint=self.checkpointing)
        skips = [full, half, quarter]
        pooled = quarter
        for _ in range(self.down_num):
            # The official model's coarser skips are plain max-pooled copies (no convolution).
            pooled = F.max_pool3d(pooled, 2)
            skips.append(pooled)
        return quarter, skips[::-1]


class Embeddings(nn.Module):
    """CNN encoder, 8^3 patch embedding, learned position embeddings and dropout."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        tokens = math.prod(config.token_grid)
        self.hybrid_model = CNNEncoder(config)
        self.patch_embeddings = nn.Conv3d(
            config.encoder_channels[-1],
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, tokens, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        quarter, skips = self.hybrid_model(x)
        return self.tokens(quarter), skips

    def tokens(self, quarter: torch.Tensor) -> torch.Tensor:
        """(B, C, D/4, H/4, W/4) encoder map -> (B, N, hidden) embedded tokens."""
        tokens = self.patch_embeddings(quarter).flatten(2).transpose(-1, -2)
        return self.dropout(tokens + self.position_embeddings)


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out projections."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.hidden_size // config.num_heads
        hidden = config.hidden_size
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(config.attention_dropout_rate)
        self.proj_dropout = nn.Dropout(config.attention_dropout_rate)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (
            self._heads(self.query(x)),
            self._heads(self.key(x)),
            self._heads(self.value(x)),
        )
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_size)
        probs = self.attn_dropout(scores.softmax(dim=-1))
        context = (probs @ value).transpose(1, 2).reshape(x.shape)
        return self.proj_dropout(self.out(context))


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, Xavier weights and N(0, 1e-6) biases."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)
        self.attn = Attention(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    """``num_layers`` transformer blocks and a final LayerNorm."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.layer = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = _run(block, x, checkpoint=self.checkpointing)
        return self.encoder_norm(x)


class Transformer(nn.Module):
    """Embeddings then the transformer encoder; returns tokens (B, N, hidden) and the skips."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, skips = self.embeddings(x)
        return self.encoder(tokens), skips


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3d k3 (no bias) + BatchNorm3d + ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Trilinear x2 upsampling (align_corners=False), concatenated skip, two conv_bn_relu."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """Tokens back to a 1/32 volume, then five decoder blocks up to full resolution."""

    def __init__(self, config: VitVNetConfig):
        super().__init__()
        self.token_grid = config.token_grid
        self.conv_more = conv_bn_relu(config.hidden_size, config.conv_first_channel)
        ins = (config.conv_first_channel, *config.decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, o, s)
            for i, o, s in zip(ins, config.decoder_channels, config.skip_channels, strict=True)
        )
        self.checkpointing = False

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.volume(tokens)
        for index, block in enumerate(self.blocks):
            skip = skips[index] if index < len(skips) else None
            x = _run(block, x, skip, checkpoint=self.checkpointing)
        return x

    def volume(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) tokens -> ``conv_more`` output (B, C, D/32, H/32, W/32)."""
        batch, _, hidden = tokens.shape
        return self.conv_more(tokens.transpose(1, 2).reshape(batch, hidden, *self.token_grid))


class RegistrationHead(nn.Sequential):
    """Conv3d k3 to 3 channels, weights N(0, flow_init_std), zero bias: starts near identity."""

    def __init__(self, in_channels: int, init_std: float):
        conv = nn.Conv3d(in_channels, 3, kernel_size=3, padding=1)
        nn.init.normal_(conv.weight, std=init_std)
        nn.init.zeros_(conv.bias)
        super().__init__(conv)


class VitVNet(nn.Module):
    """ViT-V-Net: predicts a dense displacement field from a moving and a fixed volume.

    Input (B, 2, D, H, W): channel 0 = moving, channel 1 = fixed (the official order), with
    (D, H, W) equal to ``config.img_size``. Output: flow (B, 3, D, H, W), displacement in
    voxels, channel i along array axis i; warp the moving image with
    :func:`vitreg.transform.warp` (or call :meth:`register`).
    """

    def __init__(self, config: VitVNetConfig | None = None):
        super().__init__()
        self.config = config or VitVNetConfig()
        self.transformer = Transformer(self.config)
        self.decoder = DecoderCup(self.config)
        self.reg_head = RegistrationHead(
            self.config.decoder_channels[-1], self.config.flow_init_std
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, D, H, W) moving+fixed -> flow (B, 3, D, H, W) in voxels (integrated if
        ``config.int_steps``)."""
        self._check_input(x)
        tokens, skips = self.transformer(x)
        return self._integrated(self.reg_head(self.decoder(tokens, skips)))

    def infer(
        self,
        x: torch.Tensor,
        rows_per_chunk: int = 16,
        channels_last: bool = True,
        integrate: bool = True,
    ) -> torch.Tensor:
        """The eval-mode forward with a fraction of the memory: (B, 2, D, H, W) -> flow voxels.

        The full-resolution layers (the encoder's first double convolution, the last decoder
        block and the registration head) stream through the volume in chunks of
        ``rows_per_chunk`` rows along D, keeping two rows of each layer's input between
        chunks, so no row is computed twice and the only whole full-resolution tensors are
        the first skip and the flow. With ``channels_last`` the convolutions run in
        channels-last 3D memory order (several times faster in oneDNN on CPU; the rounding
        differs from :meth:`forward` by about 1e-6 relative); without it the flow equals
        :meth:`forward`'s bit for bit. Runs under ``torch.inference_mode``; needs eval mode.
        ``integrate=False`` returns the head's raw output (the velocity of a diffeomorphic
        config, ``int_steps`` > 0) instead of its integral.
        """
        self._check_input(x)
        if self.training:
            raise RuntimeError("VitVNet.infer runs the eval-mode network: call model.eval()")
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        batch, _, depth, height, width = x.shape
        starts = range(0, depth, rows_per_chunk)
        cnn = self.transformer.embeddings.hybrid_model
        inc = cnn.inc.double_conv
        *coarse_blocks, last = self.decoder.blocks
        # Allocated outside inference mode: the caller gets an ordinary tensor, usable in autograd.
        flow = x.new_empty((batch, self.reg_head[0].out_channels, depth, height, width))
        with torch.inference_mode():
            full = torch.empty(
                (batch, inc[2].out_channels, depth, height, width),
                dtype=x.dtype,
                device=x.device,
                memory_format=layout,
            )
            rows = (x[:, :, a : a + rows_per_chunk] for a in starts)
            rows = (chunk.contiguous(memory_format=layout) for chunk in rows)
            rows = _rows_through(_rows_through(rows, inc[0], inc[1]), inc[2], inc[3])
            _write_rows(rows, full)
            quarter, skips = cnn.from_full(full)
            tokens = self.transformer.encoder(self.transformer.embeddings.tokens(quarter))
            volume = self.decoder.volume(tokens)
            if channels_last:  # otherwise keep forward's strides, and so its exact kernels
                volume = volume.contiguous(memory_format=layout)
            del full, quarter, tokens
            for index, block in enumerate(coarse_blocks):
                volume = block(volume, skips[index] if index < len(skips) else None)
            skip = skips[len(coarse_blocks)] if len(skips) > len(coarse_blocks) else None
            skips.clear()  # the coarser skips can go; ``skip`` keeps the full-resolution one
            rows = (
                _last_block_input(volume, skip, a, min(a + rows_per_chunk, depth)) for a in starts
            )
            rows = _rows_through(rows, last.conv1[0], last.conv1[1:])
            rows = _rows_through(rows, last.conv2[0], last.conv2[1:])
            rows = _rows_through(rows, self.reg_head[0])
            _write_rows(rows, flow)
        if integrate and self.config.int_steps:
            with torch.no_grad():  # not inference mode: the caller gets an ordinary tensor
                flow = self._integrated(flow)
        return flow

    def checkpoint_activations(self, enabled: bool = True) -> VitVNet:
        """Recompute each encoder stage, transformer block and decoder block in the backward
        pass instead of storing its activations (training memory for time). Returns self."""
        for part in (self.transformer.embeddings.hybrid_model, self.transformer.encoder):
            part.checkpointing = enabled
        self.decoder.checkpointing = enabled
        return self

    def _integrated(self, flow: torch.Tensor) -> torch.Tensor:
        """The head's output as a flow: integrated as a stationary velocity when
        ``config.int_steps`` > 0 (scaling and squaring), else unchanged."""
        if self.config.int_steps:
            return integrate_velocity(flow.float(), self.config.int_steps)
        return flow

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise VitregError(
                f"ViT-V-Net expects input (B, {self.config.in_channels}, D, H, W) "
                f"(channel 0 moving, 1 fixed), got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != tuple(self.config.img_size):
            check_size(tuple(x.shape[2:]))
            raise VitregError(
                f"ViT-V-Net was built for size {tuple(self.config.img_size)}, "
                f"got input of size {tuple(x.shape[2:])}; rebuild it with that img_size"
            )

    def register(
        self, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Moving and fixed (B, 1, D, H, W) -> (warped moving (B, 1, D, H, W), flow in voxels)."""
        flow = self(torch.cat([moving, fixed], dim=1))
        return warp(moving, flow), flow


# ---------------------------------------------------------------------------------------------
# Depth-chunked evaluation of full-resolution layers (VitVNet.infer)


def _rows_through(
    chunks: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
    conv: nn.Conv3d,
    after: nn.Module | None = None,
) -> Iterator[torch.Tensor]:
    """Stream (B, C, rows, H, W) chunks, in D order, through a k3/p1 ``conv`` (and ``after``).

    A chunk may be a tuple of parts to join along channels (a decoder block's upsampled input
    and its skip): they are copied once, straight into the buffer the convolution reads.
    Each chunk is joined to the last two input rows of the one before (a zero row at the
    volume's start and end stands for the convolution's padding), and the convolution runs
    unpadded along D: the output rows lag the input by one and the last comes when the input
    ends. Every output row is computed once, from exactly the inputs the whole-volume
    convolution would use.
    """
    carry = None
    for chunk in chunks:
        parts = chunk if isinstance(chunk, tuple) else (chunk,)
        ahead = 1 if carry is None else 2
        rows = _rows_buffer(
            parts[0], sum(part.shape[1] for part in parts), ahead + parts[0].shape[2]
        )
        if carry is None:
            rows[:, :, :1].zero_()
        else:
            rows[:, :, :2] = carry
        channel = 0
        for part in parts:
            rows[:, channel : channel + part.shape[1], ahead:] = part
            channel += part.shape[1]
        if rows.shape[2] >= 3:
            yield _conv_depth_valid(rows, conv, after)
        carry = rows[:, :, -2:].clone()  # a copy, so that the chunk itself can be freed
    if carry is not None:
        rows = _rows_buffer(carry, carry.shape[1], 3)
        rows[:, :, :2] = carry
        rows[:, :, 2:].zero_()
        yield _conv_depth_valid(rows, conv, after)


def _rows_buffer(like: torch.Tensor, channels: int, depth: int) -> torch.Tensor:
    """Uninitialised (B, channels, depth, H, W) tensor in ``like``'s dtype, device and memory
    order (channels last when ``like``'s channels are adjacent in memory, even in a slice)."""
    batch, _, _, height, width = like.shape
    channels_last = like.shape[1] > 1 and like.stride(1) == 1
    return torch.empty(
        (batch, channels, depth, height, width),
        dtype=like.dtype,
        device=like.device,
        memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
    )


def _conv_depth_valid(rows: torch.Tensor, conv: nn.Conv3d, after: nn.Module | None) -> torch.Tensor:
    """``conv`` (kernel 3, padding 1, stride 1) without its padding along D, then ``after``."""
    padding = (0, 1, 1)
    if rows.device.type == "cpu" and rows.dtype == torch.float32 and _ONEDNN:
        # PyTorch sends thin batch-1 inputs (N*C*D*H <= 20480) to its slow im2col kernel;
        # chunks are thin by design, so ask oneDNN (what the whole volume gets) directly.
        out = torch.mkldnn_convolution(
            rows, conv.weight, conv.bias, padding, conv.stride, conv.dilation, conv.groups
        )
    else:
        out = F.conv3d(rows, conv.weight, conv.bias, padding=padding)
    return out if after is None else after(out)


def _write_rows(chunks: Iterable[torch.Tensor], out: torch.Tensor) -> None:
    """Copy consecutive D-chunks into ``out`` (B, C, D, H, W) from row 0 on."""
    start = 0
    for chunk in chunks:
        out[:, :, start : start + chunk.shape[2]] = chunk
        start += chunk.shape[2]
    if start != out.shape[2]:
        raise RuntimeError(f"streamed {start} rows into a volume of depth {out.shape[2]}")


def _upsampled_rows(volume: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the x2 trilinear upsampling (align_corners=False) of ``volume``,
    (B, C, D, H, W) -> (B, C, stop - start, 2H, 2W), from only the rows of ``volume`` they
    read (one more on each side, so that edge clamping happens only at the true edges)."""
    low, high = max(0, start // 2 - 1), min(volume.shape[2], (stop + 1) // 2 + 1)
    up = F.interpolate(
        volume[:, :, low:high], scale_factor=2, mode="trilinear", align_corners=False
    )
    return up[:, :, start - 2 * low : stop - 2 * low]


def _last_block_input(
    volume: torch.Tensor, skip: torch.Tensor | None, start: int, stop: int
) -> tuple[torch.Tensor, ...]:
    """Rows [start, stop) of the last decoder block's input parts: upsampled ``volume``, skip."""
    up = _upsampled_rows(volume, start, stop)
    return (up,) if skip is None else (up, skip[:, :, start:stop])


def resize_position_embeddings(
    position_embeddings: torch.Tensor,
    old_grid: tuple[int, int, int],
    new_grid: tuple[int, int, int],
) -> torch.Tensor:
    """(1, N_old, hidden) embeddings on ``old_grid`` -> (1, N_new, hidden) on ``new_grid``.

    Trilinear interpolation on the token grid (D, H, W), tokens in D-major raster order.
    """
    hidden = position_embeddings.shape[-1]
    volume = position_embeddings.transpose(1, 2).reshape(1, hidden, *old_grid)
    resized = F.interpolate(volume, size=new_grid, mode="trilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2).contiguous()


def load_state_dict(
    model: VitVNet,
    state_dict: dict[str, torch.Tensor],
    trained_img_size: tuple[int, int, int] | None = None,
) -> None:
    """Load official-named tensors into ``model``, strictly.

    The ``spatial_trans.grid`` buffer of the authors' checkpoints is ignored. Position
    embeddings trained at another image size (``trained_img_size``, default the published
    160x192x224) are resized on the token grid with a warning. A missing, unexpected or
    misshaped key raises VitregError naming the key.
    """
    state = {k: v for k, v in state_dict.items() if k != "spatial_trans.grid"}
    expected = model.state_dict()
    key = "transformer.embeddings.position_embeddings"
    if key in state and state[key].shape != expected[key].shape:
        tokens = state[key].shape[1]
        trained = VitVNetConfig(img_size=tuple(trained_img_size or VitVNetConfig().img_size))
        old_grid = trained.token_grid
        if math.prod(old_grid) != tokens:
            raise VitregError(
                f"checkpoint key {key!r} holds {tokens} tokens, but a model trained at "
                f"{trained.img_size} has {math.prod(old_grid)}; pass the size it was trained at"
            )
        warnings.warn(
            f"position embeddings were trained on a {old_grid} token grid ({tokens} tokens); "
            f"resizing them trilinearly to {model.config.token_grid}",
            stacklevel=2,
        )
        state[key] = resize_position_embeddings(state[key], old_grid, model.config.token_grid)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise VitregError(f"checkpoint is missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise VitregError(f"checkpoint has unexpected key {unexpected[0]!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VitregError(
                f"checkpoint key {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
