"""Audio front ends of AniTalker: MFCC (python_speech_features conventions) and HuBERT.

Both reproduce what the official demo feeds the stage-2 model:
- MFCC: 13 MFCC + two first-order deltas at 100 Hz, cut to 4F rows -> (1, 4F, 39).
- HuBERT: all L+1 hidden states with transformers-4.19 semantics, one edge-copied frame appended,
  cut to 2F frames -> (1, L+1, 2F, H).
F is the number of 25 fps video frames the audio drives.
"""
import json
import logging
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AnitalkerError, CheckpointError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

# --------------------------------------------------------------------------------------------
# Waveform normalisation (Wav2Vec2FeatureExtractor, do_normalize=True)


def normalize_wave(wave) -> np.ndarray:
    """(N,) waveform -> (N,) float32 (x - mean) / sqrt(var + 1e-7) over the whole utterance.

    Computed in float32 numpy, exactly as the feature extractor does.
    """
    x = np.asarray(wave, dtype=np.float32).reshape(-1)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


# --------------------------------------------------------------------------------------------
# MFCC (python_speech_features 0.6 re-implemented in numpy; scipy is not a runtime dependency)


def _mel_filterbank(nfilt: int, nfft: int, sample_rate: int) -> np.ndarray:
    """(nfilt, nfft//2+1) triangular filters on floor-quantised FFT bins, 0 Hz .. Nyquist."""
    top = 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0)
    hz = 700.0 * (10.0 ** (np.linspace(0.0, top, nfilt + 2) / 2595.0) - 1.0)
    bins = np.floor((nfft + 1) * hz / sample_rate)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        up = np.arange(int(lo), int(mid))
        down = np.arange(int(mid), int(hi))
        fb[j, up] = (up - lo) / (mid - lo)
        fb[j, down] = (hi - down) / (hi - mid)
    return fb


def _dct2_ortho(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) matrix M with x @ M == scipy.fft.dct(x, type=2, norm='ortho')[..., :n_out]."""
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[:, 0] = np.sqrt(1.0 / n_in)
    return m


def _frames(signal: np.ndarray, frame_len: int, step: int) -> np.ndarray:
    """(N,) -> (T, frame_len); the last frame is zero-padded, at least one frame."""
    n = len(signal)
    count = 1 if n <= frame_len else 1 + math.ceil((n - frame_len) / step)
    padded = np.zeros((count - 1) * step + frame_len)   # float64, as the reference's concatenate
    padded[:n] = signal
    idx = np.arange(frame_len)[None, :] + step * np.arange(count)[:, None]
    return padded[idx]


def _delta(feat: np.ndarray, n: int) -> np.ndarray:
    """(T, D) -> (T, D) regression delta over +-n frames with edge padding."""
    padded = np.pad(feat, ((n, n), (0, 0)), mode="edge")
    t = len(feat)
    num = sum(i * (padded[n + i:n + i + t] - padded[n - i:n - i + t]) for i in range(1, n + 1))
    return num / (2 * sum(i * i for i in range(1, n + 1)))


def mfcc_features(wave, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(N,) waveform -> (T100, 39) float64: mfcc(numcep=13) | delta(mfcc, 1) | delta(mfcc, 2).

    python_speech_features defaults: 25 ms rectangular windows every 10 ms, nfft 512, 26 mel
    filters, pre-emphasis 0.97, lifter 22, c0 replaced by log frame energy. The second delta
    argument is the window N (the demo's quirk), so both are first-order deltas.
    The wave is taken as float32 (what librosa.load gives the demo); pre-emphasis runs in
    float32 and everything after framing in float64, as in the reference.
    """
    x = np.asarray(wave, dtype=np.float32).reshape(-1)
    if x.size == 0:
        raise AnitalkerError("the audio is empty: give at least a few milliseconds of sound")
    x = np.append(x[0], x[1:] - np.float32(0.97) * x[:-1])
    nfft, eps = 512, np.finfo(float).eps
    frames = _frames(x, int(math.floor(0.025 * sample_rate + 0.5)),
                     int(math.floor(0.01 * sample_rate + 0.5)))
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft                  # (T, 257)
    energy = power.sum(axis=1)
    mel = power @ _mel_filterbank(26, nfft, sample_rate).T                 # (T, 26)
    # zeros are replaced by eps before the log, as in the reference
    ceps = np.log(np.where(mel == 0, eps, mel)) @ _dct2_ortho(26, 13)
    ceps *= 1 + 11.0 * np.sin(np.pi * np.arange(13) / 22)                 # lifter L=22
    ceps[:, 0] = np.log(np.where(energy == 0, eps, energy))
    return np.hstack([ceps, _delta(ceps, 1), _delta(ceps, 2)])


def mfcc_model_input(feats) -> tuple[torch.Tensor, int]:
    """(T100, 39) features -> ((1, 4F, 39) float32, F) with F = T100 // 4."""
    frames = len(feats) // 4
    return torch.as_tensor(np.asarray(feats)[:4 * frames], dtype=torch.float32)[None], frames


# --------------------------------------------------------------------------------------------
# HuBERT


def queued(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on ``device``; a CPU tensor goes to a GPU through pinned memory, queued behind the GPU's work
    without making the host wait for it (a copy from pageable memory would). avatar.device.to_device."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class HubertFrontend:
    """A transformers HubertModel plus the official pre/post-processing."""

    def __init__(self, model, do_normalize: bool = True):
        self.model = model.eval()
        self.do_normalize = do_normalize
        cfg = model.config
        # shortest input the conv feature extractor accepts (400 samples for HuBERT)
        self.min_samples = cfg.conv_kernel[0] + sum(
            (k - 1) * math.prod(cfg.conv_stride[:i]) for i, k in enumerate(cfg.conv_kernel) if i)
        self.num_states = cfg.num_hidden_layers + 1
        self.hidden_size = cfg.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def states(self, wave: np.ndarray) -> torch.Tensor:
        """(N,) 16 kHz waveform -> (L+1, T50+1, H) float32 on the model's device.

        States 0..L-1 are the encoder's hidden states; state L is `last_hidden_state` (after the
        final LayerNorm in the stable-layer-norm encoder), which is what transformers 4.19
        returned as hidden_states[-1]; transformers 5.x returns the pre-LayerNorm output there.
        """
        return self.states_batch([wave])[0]

    def states_batch(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        """states() of several waveforms of one length (several streams' windows) in one model call."""
        xs = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        if xs[0].size < self.min_samples:
            raise AnitalkerError(f"the audio is too short for HuBERT ({xs[0].size} samples): "
                                 f"give at least {self.min_samples / SAMPLE_RATE * 1000:.0f} ms")
        if self.do_normalize:
            xs = [normalize_wave(x) for x in xs]
        x = torch.from_numpy(xs[0])[None] if len(xs) == 1 else torch.from_numpy(np.stack(xs))
        out = self.model(queued(x, self.device), output_hidden_states=True)
        states = torch.stack(list(out.hidden_states[:-1]) + [out.last_hidden_state])   # (L+1, B, T, H)
        states = torch.cat([states, states[:, :, -1:]], dim=2)   # demo: np.pad(..., 'edge') by one frame
        return [states[:, b] for b in range(len(xs))]


class IncrementalHubert:
    """HuBERT over a stream in blocks, computing every row's transformer states once instead of re-running
    a window of [context | block | lookahead] rows each block.

    A block is the samples of some new rows: ``block(wave, commit)`` takes samples [320 r, 320 r + N) where
    r is the first row not yet committed (the caller starts each block on a row boundary) and returns the
    (L+1, rows + 1, H) states of those rows, the last row repeated as in ``HubertFrontend.states``. Its
    first ``commit`` rows are committed: their keys and values at every layer (and their projected conv
    features, for the positional convolution) are cached, and later rows attend to them; the rows after
    them (a lookahead) are provisional and must come again at the start of the next block.

    What is exact and what is not, against the whole utterance:
    - the convolutional front end and the feature projection are per-row (layer-normalised convolutions
      with a 400-sample receptive field), so every row equals its whole-utterance value;
    - the positional convolution sees the kernel/2 (64) rows before a row (cached) and those after it up
      to the block's end, zeros beyond (the whole-utterance path has real rows there);
    - attention sees the last ``context`` committed rows, with the keys and values they had when they
      were committed (computed with their own block's right context), plus the block's own rows.
    One block holding the whole utterance therefore equals ``HubertFrontend.states`` (tests). Only
    stable-layer-norm models with a layer-normalised front end (chinese-hubert-large, hubert-large) have
    per-row convolutions; others raise.

    Computation runs in the dtype of the model's linear weights (bf16 weights prepared once run in bf16);
    the residual stream and layer norms stay float32. Pure: no threads, no clock.
    """

    def __init__(self, model, context: int = 100):
        cfg = model.config
        if cfg.feat_extract_norm != "layer" or not cfg.do_stable_layer_norm:
            raise AnitalkerError("incremental HuBERT needs a stable-layer-norm model with a layer-normalised "
                                 "front end (as chinese-hubert-large); use the window features instead")
        if context < 0:
            raise AnitalkerError(f"incremental HuBERT context must be >= 0 rows, got {context}")
        self.model, self.context = model.eval(), context
        self.heads = cfg.num_attention_heads
        conv = model.encoder.pos_conv_embed.conv
        self.pos_kernel = conv.kernel_size[0]
        self.pos_left = self.pos_kernel // 2                 # rows before a row that its position sees
        self.pos_groups = g = conv.groups
        with torch.no_grad():                                # weight norm, evaluated once
            w = conv.weight.detach().to(self.dtype)          # (H, H / g, K)
            # (g, H/g * K, H/g): each group's kernel as one matrix over a window's (channel, tap) values
            self.pos_weight = w.view(g, -1, w.shape[1] * w.shape[2]).transpose(1, 2).contiguous()
        self.pos_bias = None if conv.bias is None else conv.bias.detach().float()
        self.reset()

    def reset(self) -> None:
        """Forget every committed row (a new segment: no left context)."""
        self._proj = None       # (1, <= pos_left, H) projected conv features of the last committed rows
        self._kv = None         # per layer (k, v), each (1, heads, <= context, dh)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.feature_projection.projection.weight.dtype   # the encoder's may be packed

    @torch.inference_mode()
    def block(self, wave, commit: int) -> torch.Tensor:
        """(N,) samples of the new rows (already normalised) -> (L+1, T50 + 1, H) float32 states."""
        m, dt = self.model, self.dtype
        dev = next(m.parameters()).device
        x = queued(torch.from_numpy(np.asarray(wave, dtype=np.float32).reshape(-1)), dev)
        feats = self._front_end(x[None].to(m.feature_extractor.conv_layers[0].conv.weight.dtype))
        fp = m.feature_projection
        if fp.feat_proj_layer_norm:
            feats = fp.layer_norm(feats)
        proj = fp.projection(feats.to(fp.projection.weight.dtype)).float()   # (1, n, H)
        n = proj.shape[1]
        if not 0 <= commit <= n + 1:       # n + 1: the repeated last row counted too (a stream's end)
            raise ValueError(f"cannot commit {commit} of {n} rows")
        h = proj + self._positions(proj)
        kv, states = [], [h]
        for i, layer in enumerate(m.encoder.layers):
            h, k, v = self._layer(layer, h, None if self._kv is None else self._kv[i], dt)
            kv.append((k, v))
            states.append(h)
        states[-1] = m.encoder.layer_norm(states[-1])
        self._commit(proj, kv, min(commit, n))
        states = torch.cat(states).float()                              # (L+1, n, H)
        return torch.cat([states, states[:, -1:]], dim=1)

    def _front_end(self, wave: torch.Tensor) -> torch.Tensor:
        """The model's layer-normalised conv front end, (1, N) samples -> (1, n, C) float32 rows. The same
        ops as its own forward, run as 2-D convs in channels_last memory: each layer norm over the channels
        then reads them contiguous, where the (B, C, T) layout made transposed copies before and after every
        norm (9.3 -> 6.8 ms a hop for HuBERT-large in bf16, 2 threads; equal to 1.8e-6 in fp32, tested)."""
        h = wave[:, None, None, :]                                      # (1, 1, 1, N)
        for layer in self.model.feature_extractor.conv_layers:
            conv, norm = layer.conv, layer.layer_norm
            if h.shape[1] > 1:
                h = h.contiguous(memory_format=torch.channels_last)
            h = F.conv2d(h, conv.weight.unsqueeze(2), conv.bias, stride=(1, conv.stride[0]))
            rows = F.layer_norm(h.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            h = layer.activation(rows).permute(0, 3, 1, 2)              # (1, C, 1, n), channels_last
        return h[:, :, 0].transpose(1, 2).float()

    def _positions(self, proj: torch.Tensor) -> torch.Tensor:
        """The positional convolution of the new rows over [cached rows | new rows | zeros]."""
        n, left = proj.shape[1], self.pos_left
        past = proj.new_zeros(1, 0, proj.shape[2]) if self._proj is None else self._proj
        pad_l = left - past.shape[1]
        seq = torch.cat([past, proj], 1).transpose(1, 2)                # (1, H, P + n)
        # kernel K, even: output t sees inputs [t - K/2, t + K/2 - 1] (HF pads K/2 and drops the last)
        seq = F.pad(seq, (pad_l, self.pos_kernel - 1 - left))
        # The grouped conv as one batched matmul over the n windows it needs: oneDNN's grouped conv1d ran
        # this 16-group, 128-tap kernel at ~0.07 TFLOP/s (7.6 of a hop's 76 ms with HuBERT-large).
        w, g = self.pos_weight, self.pos_groups
        windows = seq.to(w.dtype).unfold(2, self.pos_kernel, 1)                        # (1, H, n, K)
        windows = windows.reshape(g, -1, n, self.pos_kernel).transpose(1, 2).reshape(g, n, -1)
        out = torch.bmm(windows, w).transpose(0, 1).reshape(1, n, -1).float()          # (1, n, H)
        if self.pos_bias is not None:
            out = out + self.pos_bias
        return self.model.encoder.pos_conv_embed.activation(out)

    def _layer(self, layer, h, cache, dt):
        """One stable-layer-norm encoder layer over the new rows, attending to the cached ones."""
        att = layer.attention
        a = layer.layer_norm(h).to(dt)
        b, n, d = a.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(att.q_proj(a)), split(att.k_proj(a)), split(att.v_proj(a))
        keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
        o = F.scaled_dot_product_attention(q, keys, values)
        h = h + att.out_proj(o.transpose(1, 2).reshape(b, n, d)).float()
        ff = layer.feed_forward
        f = ff.output_dense(ff.intermediate_act_fn(ff.intermediate_dense(layer.final_layer_norm(h).to(dt))))
        return h + f.float(), keys, values

    def _commit(self, proj, kv, commit: int) -> None:
        """kv: per layer the [cached | new] keys and values the block attended to; the cache becomes the
        last ``context`` rows up to the committed ones (views: no copy)."""
        if commit == 0:
            return
        self._proj = _append(self._proj, proj[:, :commit], self.pos_left)
        end = (0 if self._kv is None else self._kv[0][0].shape[2]) + commit
        start = max(0, end - self.context)
        self._kv = [(k[:, :, start:end], v[:, :, start:end]) for k, v in kv]


def _append(old: torch.Tensor | None, new: torch.Tensor, limit: int) -> torch.Tensor:
    """[old | new] along the row axis (-2), keeping the last ``limit`` rows."""
    x = new if old is None else torch.cat([old, new], -2)
    return x[..., max(0, x.shape[-2] - limit):, :]


def hubert_model_input(states) -> tuple[torch.Tensor, int]:
    """(L+1, T, H) states -> ((1, L+1, 2F, H) float32, F) with F = T // 2."""
    states = torch.as_tensor(states, dtype=torch.float32)
    frames = states.shape[1] // 2
    return states[:, :2 * frames][None], frames


# Positional-conv weight norm: transformers 4.19 (the official folder) vs newer parametrizations.
_ALIASES = {".weight_g": ".parametrizations.weight.original0",
            ".weight_v": ".parametrizations.weight.original1"}
_ALIASES.update({v: k for k, v in _ALIASES.items()})


def _key_candidates(key: str) -> list:
    """The names a file key may have in the built model (prefix and weight-norm spelling)."""
    bare = key.removeprefix("hubert.")
    return [key, bare] + [bare[:-len(old)] + new for old, new in _ALIASES.items()
                          if bare.endswith(old)]


def _remap(file_sd: dict, model_keys) -> tuple[dict, list]:
    """Rename file keys to the model's names -> (state dict, unexpected file keys)."""
    model_keys, out, unexpected = set(model_keys), {}, []
    for key, value in file_sd.items():
        name = next((k for k in _key_candidates(key) if k in model_keys), None)
        if name is None:
            unexpected.append(key)
        else:
            out[name] = value.float() if value.is_floating_point() else value
    return out, unexpected


def _read_weights(folder: str) -> dict:
    """The state dict of folder/pytorch_model.bin (weights-only unpickling) or model.safetensors."""
    bin_path = os.path.join(folder, "pytorch_model.bin")
    st_path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st_path):
        from safetensors.torch import load_file
        try:
            return load_file(st_path)
        except Exception as e:
            raise CheckpointError(f"cannot read {st_path}: {e}") from e
    if not os.path.isfile(bin_path):
        raise CheckpointError(f"no HuBERT weights in {folder}: expected pytorch_model.bin or "
                              "model.safetensors (download chinese-hubert-large into that folder)")
    try:
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {bin_path}: it needs more than plain tensors to "
                              "unpickle (unsafe). Use the official file or convert it to "
                              "model.safetensors") from e
    except Exception as e:
        raise CheckpointError(f"cannot read {bin_path}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{bin_path} is not a flat state dict of tensors")
    return sd


def _read_json(path: str, default=None) -> dict:
    if not os.path.isfile(path):
        if default is None:
            raise CheckpointError(f"missing {path}: a HuBERT folder needs its config.json")
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_hubert(folder, device="cpu") -> HubertFrontend:
    """A local HuBERT folder (config.json, optional preprocessor_config.json, weights) -> frontend.

    The model is built offline from config.json on the meta device, so every tensor must come
    from the file: anything left unloaded raises CheckpointError instead of running random.
    """
    from transformers import HubertConfig, HubertModel

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"HuBERT folder not found: {folder}")
    cfg = _read_json(os.path.join(folder, "config.json"))
    if cfg.get("model_type", "hubert") != "hubert":
        raise CheckpointError(f"{folder}/config.json is a {cfg['model_type']!r} model, not HuBERT")
    prep = _read_json(os.path.join(folder, "preprocessor_config.json"), default={})
    if prep.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise CheckpointError(f"{folder} expects {prep['sampling_rate']} Hz audio; only 16 kHz "
                              "HuBERT models are supported")
    with torch.device("meta"):
        model = HubertModel(HubertConfig(**cfg))
    sd, unexpected = _remap(_read_weights(folder), model.state_dict().keys())
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {folder} do not fit its config.json: {e}") from e
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta]
    if missing:
        raise CheckpointError(f"HuBERT weights in {folder} lack {len(missing)} tensors "
                              f"(first: {', '.join(missing[:5])}); the file does not match "
                              "config.json")
    if unexpected:
        log.warning("ignored %d unexpected keys in %s (first: %s)", len(unexpected), folder,
                    ", ".join(unexpected[:5]))
    frontend = HubertFrontend(model.to(device), do_normalize=prep.get("do_normalize", True))
    frontend.unexpected_keys = unexpected
    return frontend


def write_hubert_folder(folder, state_dict: dict, config_kwargs: dict, do_normalize: bool = True,
                        safetensors: bool = False) -> None:
    """Write a chinese-hubert-large style folder (tests, training fixtures).

    config.json = HubertConfig(**config_kwargs); weights as pytorch_model.bin (torch.save) or
    model.safetensors; preprocessor_config.json as Wav2Vec2FeatureExtractor writes it.
    """
    from transformers import HubertConfig

    os.makedirs(folder, exist_ok=True)
    HubertConfig(**config_kwargs).to_json_file(os.path.join(folder, "config.json"))
    if safetensors:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state_dict, os.path.join(folder, "pytorch_model.bin"))
    prep = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
            "sampling_rate": SAMPLE_RATE, "padding_value": 0.0, "padding_side": "right",
            "do_normalize": do_normalize, "return_attention_mask": True}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(prep, f, indent=2)
