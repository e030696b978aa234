"""Error of every faster mode against exact fp32, on the parity fixtures' weights and on random full-size weights.

    python bench/errors.py [--parity tests/fixtures/parity] [--seconds 10] [--frames 8] [--skip-full-hubert]

Modes and what is compared:
  render    fp32 + subpixel upsampling, bf16 (autocast, bf16 weight copies), bf16 + subpixel, the compiled
            fast mode's forms in fp32 (subpixel, constant kernels) and that mode itself (bf16, frozen
            compile, what --fast runs where bf16 is native): frames against
            the fp32 frames (and, for the parity weights, against the official fixture frames): max |diff|,
            mean and max grey levels after the demo's uint8 conversion, share of values off by > 4 levels
  motion    bf16 (weights prepared once): the denoiser's eps over the official sampling trajectory
            (parity) or random inputs (full size), and the DDIM motion codes, as relative L2 errors
  features  bf16 HuBERT (whole utterance), streamed HuBERT "window" (today) and "incremental", fp32 and
            bf16, against the whole-utterance fp32 features (relative L2 over all states and rows); the
            motion codes the fp32 denoiser makes from each (10 DDIM steps over the utterance)
Random weights say little about how trained weights react to rounding; the parity weights are the
official generation rule's. bf16 runs on any CPU, but emulated (no native bf16) it is slow. Writes JSON
(bench/results/errors.json) and prints the tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.features import StreamingFeatures  # noqa: E402
from avatar.pipeline import compile_frozen, cpu_name  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor, to_uint8  # noqa: E402
from bench.offline import HUBERT_LARGE  # noqa: E402
from bench.stream import speech  # noqa: E402
from models.checkpoints import stage1_from_state_dict, stage2_from_state_dict  # noqa: E402
from models.frontend import HubertFrontend, hubert_model_input  # noqa: E402
from models.precision import prepare_bf16  # noqa: E402
from models.sampler import ddim_sample, ddim_schedule  # noqa: E402
from models.stage1 import Stage1  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def frame_errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    lv = np.abs(to_uint8(got.float()).astype(int) - to_uint8(ref.float()).astype(int))
    return dict(max_abs=float((got.float() - ref.float()).abs().max()), u8_mean=float(lv.mean()),
                u8_max=int(lv.max()), u8_over_4=float((lv > 4).mean()))


@torch.inference_mode()
def render_modes(s1: Stage1, img: torch.Tensor, alphas: torch.Tensor, official=None) -> list[dict]:
    wa, _, feats = s1.encode(img)

    frozen = compile_frozen(s1.render)

    def frames(sub: bool, bf16: bool, fast: bool = False):
        """fast: the compiled mode's forms (constant kernels); with bf16 also its frozen compile."""
        s1.set_upsampling("subpixel" if sub else "transposed")
        s1.set_constant_kernels(fast)
        fn = frozen if fast and bf16 else s1.render
        with torch.autocast(**BF16, enabled=bf16):
            out = torch.cat([fn(wa, a[None], feats).float() for a in alphas])
        s1.set_upsampling("transposed")
        s1.set_constant_kernels(False)
        return out

    ref = frames(False, False)
    rows = []
    if official is not None:
        rows.append(dict(mode="fp32 vs official", **frame_errors(ref, official)))
    for name, sub, bf16, fast in (("fp32 + subpixel", True, False, False), ("bf16", False, True, False),
                                  ("bf16 + subpixel", True, True, False),
                                  ("fp32 + subpixel + constant kernels", True, False, True),
                                  ("bf16 frozen compile (--fast)", True, True, True)):
        got = frames(sub, bf16, fast)
        rows.append(dict(mode=name, **frame_errors(got, ref)))
        if official is not None:
            rows.append(dict(mode=f"{name} vs official", **frame_errors(got, official)))
    return rows


@torch.inference_mode()
def motion_modes(s2: Stage2, wa, alpha0, audio, x_T, traj_x=None, traj_t=None, steps: int = 50) -> dict:
    """fp32 against bf16 (weights prepared once): eps on the given inputs and the sampled codes."""
    s2b = prepare_bf16(copy.deepcopy(s2))
    schedule = ddim_schedule(steps)
    out = {}
    for name, model, bf16 in (("fp32", s2, False), ("bf16", s2b, True)):
        with torch.autocast(**BF16, enabled=bf16):
            cond = model.condition(wa, alpha0, audio)
            if traj_x is not None:
                eps = torch.stack([model.eps(cond, x, torch.tensor([int(t)])).float() for x, t in zip(traj_x, traj_t)])
            else:
                eps = torch.stack([model.eps(cond, x_T, torch.tensor([t])).float() for t in (980, 500, 20)])
            codes = ddim_sample(lambda x, t: model.eps(cond, x, t).float(), x_T, schedule)
        out[name] = (eps, codes)
    return dict(eps_rel=rel(out["bf16"][0], out["fp32"][0]), codes_rel=rel(out["bf16"][1], out["fp32"][1]),
                codes_mean_abs=float((out["bf16"][1] - out["fp32"][1]).abs().mean()),
                codes_clamped=float((out["fp32"][1].abs() >= 0.999).float().mean()))


def stream_features(frontend, wave, hubert: str, bf16: bool, block=10, context=25, lookahead=5) -> torch.Tensor:
    sf = StreamingFeatures(frontend, "hubert", block, context, lookahead, normalize="running", hubert=hubert)
    blocks = []
    with torch.inference_mode(), torch.autocast(**BF16, enabled=bf16):
        for i in range(0, len(wave), 1600):
            sf.push(wave[i:i + 1600])
            blocks += sf.ready()
        blocks += sf.finish()
    return torch.cat([f for _, f in blocks], dim=1)


@torch.inference_mode()
def feature_modes(frontend: HubertFrontend, wave, s2: Stage2 | None, code, block, context, lookahead,
                  hubert_modes=("window", "incremental")) -> list[dict]:
    ref, frames = hubert_model_input(frontend.states(wave))
    ref = ref[0]
    fb = HubertFrontend(prepare_bf16(copy.deepcopy(frontend.model)), frontend.do_normalize)
    results = {"bf16 whole utterance": hubert_model_input(_bf16_states(fb, wave))[0][0]}
    for mode in hubert_modes:
        for bf16 in (False, True):
            fe = fb if bf16 else frontend
            results[f"{mode}{' + bf16' if bf16 else ''}"] = stream_features(fe, wave, mode, bf16, block, context,
                                                                          lookahead)[:, :ref.shape[1]]
    rows = []
    ref_codes = _codes(s2, code, ref) if s2 is not None else None
    for name, got in results.items():
        row = dict(mode=name, features_rel=rel(got, ref),
                   cos_mean=float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), -1).mean()))
        if s2 is not None:
            c = _codes(s2, code, got)
            row.update(codes_rel=rel(c, ref_codes), codes_mean_abs=float((c - ref_codes).abs().mean()))
        rows.append(row)
    return rows


def _bf16_states(fb, wave):
    with torch.autocast(**BF16):
        return fb.states(wave)


def _codes(s2, code, feats, steps: int = 10) -> torch.Tensor:
    wa, alpha0 = code
    frames = feats.shape[1] // 2
    x_T = torch.randn(1, frames, s2.dims.motion_dim, generator=torch.Generator().manual_seed(0))
    cond = s2.condition(wa, alpha0, feats[None, :, :2 * frames])
    return ddim_sample(lambda x, t: s2.eps(cond, x, t).float(), x_T, ddim_schedule(steps))


def parity_part(root: Path) -> dict:
    """The parity case's synthetic weights, made by the project's own implementation of the weight rule."""
    sys.path.insert(0, str(ROOT / "tests"))
    from parity_fixtures import manifest, seed_of, synthetic_weights
    case = root / "case_a"
    seed = seed_of(case)
    out = {}
    a = np.load(case / "stage1.npz")
    s1 = stage1_from_state_dict(synthetic_weights(manifest(case, "manifest_stage1.json"), seed)).eval()
    out["render"] = render_modes(s1, torch.from_numpy(a["image_in"]), torch.from_numpy(a["alphas"]),
                                 official=torch.from_numpy(a["frames"]))
    b = np.load(case / "stage2.npz")
    sd = synthetic_weights(manifest(case, "manifest_stage2_hubert_audio_only.json"), seed)
    s2 = stage2_from_state_dict(sd).eval()
    tag = "hubert_audio_only"
    out["motion"] = motion_modes(s2, torch.from_numpy(b["wa"]), torch.from_numpy(b["alpha0"]),
                                 torch.from_numpy(b["hubert_audio_f16"].astype(np.float32)), torch.from_numpy(b["x_T"]),
                                 torch.from_numpy(b[f"{tag}__traj_x_in"]), b[f"{tag}__traj_t"], int(b["step_T"]))
    from models.frontend import write_hubert_folder, load_hubert
    import tempfile
    fx = np.load(case / "audio_frontend.npz")
    sdh = synthetic_weights(manifest(case, "manifest_hubert_tiny.json"), seed)
    with tempfile.TemporaryDirectory() as d:
        write_hubert_folder(d, sdh, json.loads((root / "hubert_tiny_config.json").read_text()))
        hub = load_hubert(d)
    # 1 s of audio = 25 frames: blocks of 5 frames, 10 of context, 2 of lookahead
    out["features"] = feature_modes(hub, fx["wave"], None, None, block=5, context=10, lookahead=2)
    return out


def full_part(seconds: float, frames: int, skip_hubert: bool) -> dict:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    s1 = Stage1().eval()
    img = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    with torch.inference_mode():
        wa, alpha0, _ = s1.encode(img)
    g = torch.Generator().manual_seed(1)
    alphas = (alpha0 + 0.3 * torch.randn(frames, alpha0.shape[1], generator=g)).clamp(-1, 1)
    out = {"render": render_modes(s1, img, alphas)}
    s2 = Stage2(Stage2Dims()).eval()
    audio = torch.randn(1, 25, 2 * 25, 1024, generator=g)
    out["motion"] = motion_modes(s2, wa, alpha0, audio, torch.randn(1, 25, 20, generator=g))
    if not skip_hubert:
        hub = HubertFrontend(HubertModel(HubertConfig(**HUBERT_LARGE)).eval())
        out["features"] = feature_modes(hub, speech(seconds), s2, (wa, alpha0), block=10, context=25, lookahead=5)
    return out


def print_tables(name: str, part: dict) -> None:
    print(f"\n## {name}")
    if "render" in part:
        print("| render mode | max abs | grey levels mean | max | > 4 levels |\n|---|---:|---:|---:|---:|")
        for r in part["render"]:
            print(f"| {r['mode']} | {r['max_abs']:.2e} | {r['u8_mean']:.3f} | {r['u8_max']} | {r['u8_over_4']:.2%} |")
    if "motion" in part:
        m = part["motion"]
        print(f"motion bf16 vs fp32: eps rel {m['eps_rel']:.4f}, codes rel {m['codes_rel']:.4f} (mean abs "
              f"{m['codes_mean_abs']:.4f}; {m['codes_clamped']:.0%} of the fp32 codes clamped at +-1)")
    if "features" in part:
        print("| features mode | rel L2 vs whole fp32 | cos mean | codes rel | codes mean abs |\n|---|---:|---:|---:|---:|")
        for r in part["features"]:
            print(f"| {r['mode']} | {r['features_rel']:.4f} | {r['cos_mean']:.4f} | {r.get('codes_rel', float('nan')):.4f} | "
                  f"{r.get('codes_mean_abs', float('nan')):.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parity", default=str(ROOT / "tests" / "fixtures" / "parity"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--skip-full-hubert", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "errors.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = dict(bench="errors", cpu=cpu_name(), torch=torch.__version__)
    if (Path(args.parity) / "case_a").is_dir():
        result["parity"] = parity_part(Path(args.parity))
        print_tables("parity weights (case A)", result["parity"])
    result["full"] = full_part(args.seconds, args.frames, args.skip_full_hubert)
    print_tables("random full-size weights", result["full"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
