"""DDIM schedule and sampler: golden numbers, fixture trajectory replay, eta > 0, the last step."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import parity_fixtures
from models.sampler import Schedule, ddim_sample, ddim_schedule



def test_schedule_golden_numbers():
    s = ddim_schedule(50)
    assert isinstance(s, Schedule) and len(s) == 50
    assert s.timesteps.dtype == torch.int64 and s.alphas_cumprod.dtype == torch.float64
    assert s.timesteps.tolist() == list(range(0, 1000, 20))
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ac[::20], rtol=1e-13, atol=0)
    assert s.alphas_cumprod[0].item() == pytest.approx(0.9999, abs=1e-15)
    assert s.alphas_cumprod[-1].item() == pytest.approx(5.9037513708533784e-05, rel=1e-12)  # t=980
    s25 = ddim_schedule(25)
    assert s25.timesteps.tolist() == list(range(0, 1000, 40))                 # 960..0
    np.testing.assert_allclose(s25.alphas_cumprod.numpy(), ac[::40], rtol=1e-13, atol=0)
    assert ddim_schedule(1000).timesteps.tolist() == list(range(1000))
    assert ddim_schedule(10, T=100).timesteps.tolist() == list(range(0, 100, 10))


def test_schedule_bit_exact_with_the_fixture():
    z = parity_fixtures.load(parity_fixtures.CASE_A, "stage2.npz")
    s = ddim_schedule(int(z["step_T"]))
    assert np.array_equal(s.timesteps.numpy(), z["ddim_timesteps"])
    assert np.array_equal(s.alphas_cumprod.numpy(), z["ddim_alphas_cumprod"])


@pytest.mark.parametrize("steps,nearby", [(49, "48, 50"), (1, "2"), (0, "2"), (1001, "1000"), (700, "500, 1000")])
def test_invalid_step_counts_raise(steps, nearby):
    with pytest.raises(ValueError, match=f"{steps} DDIM steps.*nearby valid step counts: .*{nearby}"):
        ddim_schedule(steps)


def _replay(eps_list):
    it = iter(eps_list)
    return lambda x, t: next(it)


@pytest.mark.parametrize("tag", ["hubert_audio_only", "hubert_full_control__ctrl", "mfcc_full_control"])
def test_trajectory_replay_matches_the_fixture(tag):
    """The official network outputs, fed to our sampler, give the official x0s and next inputs."""
    z = parity_fixtures.load(parity_fixtures.CASE_A, "stage2.npz")
    eps = list(torch.from_numpy(z[f"{tag}__traj_eps"]))
    seen = []
    out = ddim_sample(_replay(eps), torch.from_numpy(z["x_T"]), ddim_schedule(int(z["step_T"])),
                      on_step=lambda i, t, x, e, x0: seen.append((i, t, x, e, x0)))
    assert [s[0] for s in seen] == list(range(len(eps)))
    assert all(s[1].dtype == torch.int64 and s[1].shape == (1,) for s in seen)
    assert [int(s[1][0]) for s in seen] == z[f"{tag}__traj_t"].tolist()
    x_in = np.stack([s[2].numpy() for s in seen])
    x0 = np.stack([s[4].numpy() for s in seen])
    assert np.abs(x_in - z[f"{tag}__traj_x_in"]).max() < 1e-4            # observed <= 3e-5; README tol 1e-3
    assert np.abs(x0 - z[f"{tag}__traj_pred_xstart"]).max() < 1e-4
    assert np.abs(out.numpy() - z[f"{tag}__sample"]).max() < 1e-4
    assert torch.equal(seen[0][2], torch.from_numpy(z["x_T"])) and all(s[3] is e for s, e in zip(seen, eps))


def _toy_denoiser(x, t):
    # Smooth, t-dependent and non-trivial, so trajectories differ between runs that differ at all.
    return torch.tanh(1.5 * x) + 0.001 * t.view(-1, 1, 1).float() * torch.sin(x)


def test_last_step_returns_x0_and_samples_are_clamped():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 7, 20, generator=g)
    for eta, clip in ((0.0, True), (0.0, False), (0.7, True)):
        last = {}
        out = ddim_sample(_toy_denoiser, x_T, ddim_schedule(25), eta=eta, clip=clip,
                          generator=torch.Generator().manual_seed(1), on_step=lambda i, t, x, e, x0: last.update(x0=x0))
        assert torch.equal(out, last["x0"])
    assert out.abs().max() <= 1.0
    # a huge eps would push x0 far outside [-1, 1]: clip keeps every prediction inside
    seen = []
    ddim_sample(lambda x, t: 50 * torch.ones_like(x), x_T, ddim_schedule(10),
                on_step=lambda i, t, x, e, x0: seen.append(x0.abs().max()))
    assert max(seen) <= 1.0


def test_eta_noise_is_deterministic_given_the_generator():
    x_T = torch.randn(1, 5, 20, generator=torch.Generator().manual_seed(3))
    run = lambda seed, eta=0.5: ddim_sample(_toy_denoiser, x_T, ddim_schedule(20), eta=eta,
                                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # eta = 0 draws nothing: the generator is irrelevant and the result is the deterministic DDIM
    assert torch.equal(run(7, 0.0), run(8, 0.0))
    assert torch.equal(run(7, 0.0), ddim_sample(_toy_denoiser, x_T, ddim_schedule(20)))
    assert not torch.equal(a, run(7, 0.0))


def test_denoiser_sees_original_timesteps_in_descending_order():
    ts = []
    ddim_sample(lambda x, t: (ts.append(t.clone()), torch.zeros_like(x))[1], torch.zeros(3, 4, 20), ddim_schedule(25))
    assert all(t.dtype == torch.int64 and t.shape == (3,) and (t == t[0]).all() for t in ts)
    assert [int(t[0]) for t in ts] == list(range(960, -1, -40))
