"""Stage 2 of AniTalker: the audio-to-motion denoiser (the official ``DiffusionPredictor``).

Audio features -> speech encoder (HuBERT: softmax layer mix, stride-2 conv, conformer; MFCC: two
stride-2 convs) -> optional variance adapter (location, scale, pose) -> concat with the portrait
codes, the noisy motion and the timestep -> conformer decoder -> predicted eps.

Module and parameter names follow the official checkpoint (``ema_model.`` stripped), so its
state dict loads with strict=True. The conformer reproduces espnet 202301's post-LN, macaron,
relative-position encoder exactly. Everything that does not depend on x_t or t is computed once
by ``condition()``; ``eps()`` is the per-step part. ``forward()`` is the official call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUDIO_KINDS = ("hubert", "mfcc")
CONTROL_KINDS = ("audio_only", "pose_only", "full_control")
# (control name, module prefix in the checkpoint, channels), in the official adapter order.
_ADAPTERS = {
    "audio_only": (),
    "pose_only": (("pose", "pose", 3),),
    "full_control": (("location", "location", 1), ("scale", "face_scale", 1), ("pose", "pose", 3)),
}


@dataclass(frozen=True)
class Stage2Dims:
    audio: str = "hubert"          # "hubert" | "mfcc"
    control: str = "audio_only"    # "audio_only" | "pose_only" | "full_control"
    hubert_dim: int = 1024
    hubert_layers: int = 25        # hidden states fed in (transformer layers + 1)
    mfcc_dim: int = 39
    speech_dim: int = 512
    speech_layers: int = 4         # unused for mfcc (no speech conformer)
    decoder_layers: int = 2
    proj_dim: int = 128
    motion_dim: int = 20
    style_dim: int = 512
    heads: int = 2
    conv_kernel: int = 13
    lstm_hidden: int = 128
    lstm_layers: int = 2

    def __post_init__(self):
        if self.audio not in AUDIO_KINDS:
            raise ValueError(f"audio must be one of {AUDIO_KINDS}, got {self.audio!r}")
        if self.control not in CONTROL_KINDS:
            raise ValueError(f"control must be one of {CONTROL_KINDS}, got {self.control!r}")
        for d in (self.speech_dim, self.decoder_dim):
            if d % self.heads or d % 2:  # whole heads; the sin/cos table interleaves pairs
                raise ValueError(f"width {d} must be even and divisible by heads = {self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same-length padding), got {self.conv_kernel}")

    @property
    def decoder_dim(self) -> int:
        return self.speech_dim + 4 * self.proj_dim

    @property
    def infer_type(self) -> str:
        return f"{self.audio}_{self.control}"


# ---------------------------------------------------------------------------------------------
# espnet-style conformer


def rel_positions(T: int, d: int, device=None, dtype=torch.float32) -> Tensor:
    """Sinusoidal table for relative positions T-1, ..., 0, ..., -(T-1): (1, 2T-1, d).

    Made for any T on demand (espnet caches a 5000-long table and slices the middle; the
    values are the same because each row depends only on its position). Built in float32.
    """
    pos = torch.arange(T - 1, -T, -1, dtype=torch.float32, device=device)
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d))
    ang = pos[:, None] * inv[None, :]
    pe = torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(1)   # interleave: even sin, odd cos
    return pe.unsqueeze(0).to(dtype)


class FeedForward(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d, d), nn.Linear(d, d)   # linear_units == d in AniTalker
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.drop(F.silu(self.w_1(x))))


class RelSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (espnet rel_selfattn)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.linear_q, self.linear_k = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.dk))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.dk))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.drop = nn.Dropout(dropout)

    def project_pos(self, pos: Tensor) -> Tensor:
        """(1, 2T-1, D) table -> (1, h, 2T-1, dk); independent of the input, hence cacheable."""
        return self.linear_pos(pos).view(pos.shape[0], -1, self.h, self.dk).transpose(1, 2)

    def forward(self, x: Tensor, p: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """x (B, T, D), p = project_pos(table) -> (B, T, D). Full bidirectional; valid (1|B, T) bool, if
        given: frames that are False are padding, which no frame attends to."""
        B, T, D = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.dk)
        k = self.linear_k(x).view(B, T, self.h, self.dk).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.dk).transpose(1, 2)
        ac = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)       # (B, h, T, T)
        bd = (q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)       # (B, h, T, 2T-1)
        # Relative shift: column j of row i must hold relative position i-j, which sits at
        # table index (T-1) - i + j (the table starts at position T-1).
        idx = (T - 1) - torch.arange(T, device=x.device)[:, None] + torch.arange(T, device=x.device)
        bd = bd.gather(-1, idx.expand(B, self.h, T, T))
        scores = (ac + bd) / math.sqrt(self.dk)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = self.drop(torch.softmax(scores, dim=-1))
        return self.linear_out((attn @ v).transpose(1, 2).reshape(B, T, D))


class ConvModule(nn.Module):
    """pointwise (C->2C) -> GLU -> depthwise k -> BatchNorm -> swish -> pointwise (C->C)."""

    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise_conv = nn.Conv1d(d, d, kernel, padding=(kernel - 1) // 2, groups=d)
        self.norm = nn.BatchNorm1d(d)   # eval: running statistics, eps 1e-5
        self.pointwise_conv2 = nn.Conv1d(d, d, 1)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """(B, T, C) -> (B, T, C); padding frames (valid False) enter the depthwise conv as zeros, as the
        conv's own padding past the last frame does."""
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        if valid is not None:
            x = x.masked_fill(~valid[:, None, :], 0.0)
        x = F.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Post-LN macaron conformer block (espnet normalize_before=False, concat_after=False)."""

    def __init__(self, d: int, heads: int, kernel: int, dropout: float):
        super().__init__()
        self.self_attn = RelSelfAttention(d, heads, dropout)
        self.feed_forward = FeedForward(d, dropout)
        self.feed_forward_macaron = FeedForward(d, dropout)
        self.conv_module = ConvModule(d, kernel)
        ln = lambda: nn.LayerNorm(d, eps=1e-12)  # noqa: E731 - espnet's LayerNorm eps
        self.norm_ff, self.norm_mha, self.norm_ff_macaron = ln(), ln(), ln()
        self.norm_conv, self.norm_final = ln(), ln()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, p: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        x = self.norm_ff_macaron(x + 0.5 * self.drop(self.feed_forward_macaron(x)))
        x = self.norm_mha(x + self.drop(self.self_attn(x, p, valid)))
        x = self.norm_conv(x + self.drop(self.conv_module(x, valid)))
        x = self.norm_ff(x + 0.5 * self.drop(self.feed_forward(x)))
        return self.norm_final(x)


class Conformer(nn.Module):
    """espnet conformer Encoder with input_layer=None: x*sqrt(d) + rel-pos table, blocks, no after_norm."""

    def __init__(self, d: int, layers: int, heads: int, kernel: int, dropout: float):
        super().__init__()
        self.d = d
        self.encoders = nn.ModuleList(ConformerBlock(d, heads, kernel, dropout) for _ in range(layers))
        self.drop = nn.Dropout(dropout)   # espnet's positional dropout, applied to x and the table

    def positions(self, T: int, like: Tensor) -> list[Tensor]:
        """Per-block projected position tables for length T (depend only on T and the weights)."""
        pe = self.drop(rel_positions(T, self.d, like.device, like.dtype))
        return [blk.self_attn.project_pos(pe) for blk in self.encoders]

    def forward(self, x: Tensor, pos: Optional[list[Tensor]] = None, valid: Optional[Tensor] = None) -> Tensor:
        """(B, T, d) -> (B, T, d); pos from positions(T) may be passed in to reuse it. valid (1|B, T) bool:
        frames that are False are padding, which the other frames do not see (per-frame layers aside,
        attention and the convolutions are the only places frames meet)."""
        if pos is None:
            pos = self.positions(x.shape[1], x)
        x = self.drop(x * math.sqrt(self.d))
        for blk, p in zip(self.encoders, pos):
            x = blk(x, p, valid)
        return x


# ---------------------------------------------------------------------------------------------
# variance adapter and the denoiser


class LSTM(nn.Module):
    """Unidirectional multi-layer LSTM + Linear: (B, T, in) -> (B, T, out)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.lstm(x)[0])


@dataclass
class Condition:
    """What one sampling run needs that does not depend on x_t or t (computed once).

    prefix:   (B, F, speech_dim + 2*proj_dim) = [speech | alpha0 proj | wa proj], the first part
              of the decoder input
    location: (B, F, 1), scale: (B, F, 1), pose: (B, F, 3): the controls used (given or
              predicted); for controls without an adapter, whatever was given (maybe None)
    positions: the decoder's projected rel-pos tables for F frames (one per block)
    valid:    (1, F) bool when the last frames are padding (Stage2.pad), else None
    """
    prefix: Tensor
    location: Optional[Tensor]
    scale: Optional[Tensor]
    pose: Optional[Tensor]
    positions: list[Tensor]
    valid: Optional[Tensor] = None

    @property
    def frames(self) -> int:
        return self.prefix.shape[1]


class Stage2(nn.Module):
    """The AniTalker stage-2 denoiser. state_dict() == the official ``ema_model.*`` keys, stripped."""

    def __init__(self, dims: Stage2Dims = Stage2Dims(), dropout: float = 0.0):
        super().__init__()
        self.dims = d = dims
        S, P = d.speech_dim, d.proj_dim
        if d.audio == "hubert":
            self.weights = nn.Parameter(torch.zeros(d.hubert_layers))   # softmax'd layer mix
            self.down_sample1 = nn.Conv1d(d.hubert_dim, S, 3, stride=2, padding=1)   # 50 -> 25 Hz
            self.speech_encoder = Conformer(S, d.speech_layers, d.heads, d.conv_kernel, dropout)
        else:   # 100 -> 50 -> 25 Hz, no activation and no conformer, as in the official model
            self.down_sample1 = nn.Conv1d(d.mfcc_dim, S // 2, 3, stride=2, padding=1)
            self.down_sample2 = nn.Conv1d(S // 2, S, 3, stride=2, padding=1)
        self.adapters = _ADAPTERS[d.control]
        for _, prefix, c in self.adapters:
            self.add_module(f"{prefix}_predictor", LSTM(S, c, d.lstm_hidden, d.lstm_layers))
            self.add_module(f"{prefix}_encoder", LSTM(c, S, d.lstm_hidden, d.lstm_layers))
        self.encoder_direction_code = nn.Linear(d.motion_dim, P)
        self.init_code_proj = nn.Sequential(nn.Linear(d.style_dim, P))
        self.noisy_encoder = nn.Sequential(nn.Linear(d.motion_dim, P))
        self.t_encoder = nn.Sequential(nn.Linear(1, P))
        self.coarse_decoder = Conformer(d.decoder_dim, d.decoder_layers, d.heads, d.conv_kernel, dropout)
        self.out_proj = nn.Linear(d.decoder_dim, d.motion_dim)

    def speech(self, audio: Tensor) -> Tensor:
        """hubert (B, L, 2F, H) | mfcc (B, 4F, 39) -> speech features (B, F, speech_dim)."""
        if self.dims.audio == "hubert":
            w = torch.softmax(self.weights, dim=0)
            x = (audio * w.view(1, -1, 1, 1)).sum(dim=1)                      # (B, 2F, H)
            x = self.down_sample1(x.transpose(1, 2)).transpose(1, 2)          # (B, F, S)
            return self.speech_encoder(x)
        x = self.down_sample2(self.down_sample1(audio.transpose(1, 2)))
        return x.transpose(1, 2)

    def condition(self, wa: Tensor, alpha0: Tensor, audio: Tensor, location: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None, pose: Optional[Tensor] = None) -> Condition:
        """wa (B, style), alpha0 (B, M), audio as in speech(); controls (B, F, 1|1|3) or None.

        Each adapted control left None is predicted from the speech features at that point of
        the adapter (location -> scale -> pose, residual adds), i.e. per control rather than
        the official all-or-nothing control_flag. Batch 1 wa/alpha0 broadcast over the audio batch.
        """
        x = self.speech(audio)
        B, T, _ = x.shape
        used = {"location": location, "scale": scale, "pose": pose}
        for name, prefix, c in self.adapters:
            v = used[name]
            if v is None:
                v = getattr(self, f"{prefix}_predictor")(x)
            elif v.shape[-2:] != (T, c):
                raise ValueError(f"{name} must be (B, {T}, {c}) for {T} frames, got {tuple(v.shape)}")
            x = x + getattr(self, f"{prefix}_encoder")(v)
            used[name] = v
        codes = torch.cat([self.encoder_direction_code(alpha0), self.init_code_proj(wa)], dim=-1)
        prefix = torch.cat([x, codes.unsqueeze(1).expand(B, T, -1)], dim=-1)
        return Condition(prefix, used["location"], used["scale"], used["pose"],
                         self.coarse_decoder.positions(T, prefix))

    eps_backend = None    # eps(cond, x_t, t) computed elsewhere (avatar.openvino_denoiser), None: here

    def eps(self, cond: Condition, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, F, M), t (B,) int64 ORIGINAL timestep -> eps (B, F, M).

        t enters t_encoder as a raw float (980.0, ...), as in the official model. A batch-1
        condition broadcasts over a batch of x_t.
        """
        B, T, _ = x_t.shape
        if T != cond.frames:
            raise ValueError(f"x_t has {T} frames but the condition has {cond.frames}")
        if self.eps_backend is not None:
            return self.eps_backend(cond, x_t, t)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1, 1).to(x_t.dtype).expand(B, 1)
        h = torch.cat([cond.prefix.expand(B, -1, -1), self.noisy_encoder(x_t),
                       self.t_encoder(t).unsqueeze(1).expand(B, T, -1)], dim=-1)
        return self.out_proj(self.coarse_decoder(h, cond.positions, cond.valid))

    def pad(self, cond: Condition, frames: int) -> Condition:
        """cond for x_t of ``frames`` >= cond.frames frames, the frames past cond.frames padding: the
        decoder masks them out, so the first frames' eps are as without them (up to the rounding of
        longer sums). Every window then has one shape, which a CUDA graph needs."""
        T = cond.frames
        prefix = F.pad(cond.prefix, (0, 0, 0, frames - T))
        valid = (torch.arange(frames, device=prefix.device) < T)[None]
        return replace(cond, prefix=prefix, positions=self.coarse_decoder.positions(frames, prefix), valid=valid)

    def forward(self, wa: Tensor, alpha0: Tensor, audio: Tensor, location: Tensor, scale: Tensor,
                pose: Tensor, x_t: Tensor, t: Tensor, control: bool):
        """The official call: -> (eps (B, F, M), location, scale, pose).

        control=True uses the given controls; False predicts every adapted control. Controls
        the model has no adapter for are returned as given.
        """
        given = {"location": location, "scale": scale, "pose": pose}
        if not control:
            for name, _, _ in self.adapters:
                given[name] = None
        cond = self.condition(wa, alpha0, audio, **given)
        return self.eps(cond, x_t, t), cond.location, cond.scale, cond.pose
