import math

import pytest
import torch

from genart_utils import data, gan, metrics, training


def test_losses_at_d_equal_half():
    zero = torch.zeros(7)  # logit 0 <=> D = 1/2 everywhere
    assert math.isclose(float(gan.value_function(zero, zero)), -math.log(4), rel_tol=1e-6)
    assert math.isclose(float(gan.discriminator_loss(zero, zero)), math.log(4), rel_tol=1e-6)
    assert math.isclose(float(gan.generator_loss(zero, "non_saturating")), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(gan.generator_loss(zero, "saturating")), -math.log(2), rel_tol=1e-6)


def test_losses_from_logits_equal_losses_from_probabilities():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(60, generator=g, dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(gan.discriminator_loss(real, fake),
                               -(d_real.log().mean() + (1 - d_fake).log().mean()))
    torch.testing.assert_close(gan.generator_loss(fake, "non_saturating"), -d_fake.log().mean())
    torch.testing.assert_close(gan.generator_loss(fake, "saturating"), (1 - d_fake).log().mean())


def test_losses_stay_finite_where_probabilities_saturate():
    extreme = torch.tensor([-200.0, 200.0])  # sigmoid rounds to exactly 0 and 1 in float32
    assert torch.sigmoid(extreme).tolist() == [0.0, 1.0]
    for value in (gan.discriminator_loss(extreme, extreme), gan.generator_loss(extreme),
                  gan.generator_loss(extreme, "saturating")):
        assert torch.isfinite(value)
    # -log D(G(z)) for a confidently rejected sample is the logit's magnitude.
    assert math.isclose(float(gan.generator_loss(torch.tensor([-200.0]))), 200.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown generator loss"):
        gan.generator_loss(extreme, "wasserstein")


def test_generator_loss_gradients_wrt_logit():
    logits = torch.tensor([-6.0, 0.0, 6.0], requires_grad=True)
    (g_sat,) = torch.autograd.grad(gan.generator_loss(logits, "saturating") * 3, logits)
    (g_ns,) = torch.autograd.grad(gan.generator_loss(logits, "non_saturating") * 3, logits)
    d = torch.sigmoid(logits.detach())
    torch.testing.assert_close(g_sat, -d)          # vanishes as D -> 0
    torch.testing.assert_close(g_ns, -(1 - d))     # largest as D -> 0


def test_dcgan_shapes_and_init():
    cfg = gan.DCGANConfig(latent_dim=16, g_width=8, d_width=8)
    G, D = gan.build_dcgan(cfg)
    z = torch.randn(5, 16)
    x = G(z)
    assert x.shape == (5, 1, 28, 28) and x.abs().max() <= 1
    assert D(x).shape == (5,)
    w = G.net[0].weight
    assert abs(float(w.detach().std()) - 0.02) < 0.005


def test_mlp_gan_shapes():
    cfg = gan.MLPGANConfig(hidden=16, depth=2)
    assert gan.MLPGenerator(cfg)(torch.randn(4, 2)).shape == (4, 2)
    assert gan.MLPDiscriminator(cfg)(torch.randn(4, 2)).shape == (4,)


def test_sample_is_deterministic_under_a_seed_and_restores_mode():
    G, _ = gan.build_dcgan(gan.DCGANConfig(latent_dim=8, g_width=4, d_width=4))
    a = gan.sample(G, 6, generator=torch.Generator().manual_seed(3))
    b = gan.sample(G, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and G.training
    assert not torch.equal(a, gan.sample(G, 6, generator=torch.Generator().manual_seed(4)))


def test_slerp_end_points_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(64, generator=g), torch.randn(64, generator=g)
    path = gan.slerp(z0, z1, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    assert path.norm(dim=1).min() > 0.9 * min(z0.norm(), z1.norm())


def test_tiny_gan_covers_more_modes_after_training():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, centers = data.ring_of_gaussians(4096, modes=8, radius=2.0, std=0.05, generator=g)
    cfg = gan.MLPGANConfig(hidden=64, depth=2, lr=2e-3)
    G, D = gan.MLPGenerator(cfg), gan.MLPDiscriminator(cfg)
    opt_g, opt_d = gan.adam_pair(G, D, cfg.lr, cfg.beta1)

    def coverage():
        with torch.no_grad():
            s = G(torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
        return metrics.mode_coverage(s, centers, std=0.05, threshold=4.0)

    before = coverage()
    step = gan.make_train_step(G, D, opt_g, opt_d, latent_dim=2, generator=g)
    training.train(step, training.minibatches(x, batch_size=256), 800, progress=False)
    after = coverage()
    assert after["modes_covered"] >= before["modes_covered"] + 3
    assert after["high_quality"] > before["high_quality"]


# ----------------------------------------------------------------- theory helpers

def _gauss_log_pdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def test_optimal_discriminator_is_the_density_ratio_and_stable():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    lp, lq = _gauss_log_pdf(x, 0.0, 1.0), _gauss_log_pdf(x, 1.0, 2.0)
    torch.testing.assert_close(gan.optimal_discriminator(lp, lq), lp.exp() / (lp.exp() + lq.exp()))
    assert torch.all(gan.optimal_discriminator(lp, lp) == 0.5)
    # Far in the tails both densities underflow to 0 but the ratio is still well defined.
    far = gan.optimal_discriminator(torch.tensor([-2000.0]), torch.tensor([-2001.0]))
    assert math.isclose(float(far), 1 / (1 + math.exp(-1)), rel_tol=1e-6)


def test_virtual_criterion_is_minus_log4_plus_twice_jsd():
    from genart_utils import distributions

    x = torch.linspace(-20, 20, 200_001, dtype=torch.float64)
    dx = float(x[1] - x[0])
    lp = _gauss_log_pdf(x, 0.0, 1.0)
    for mu, sigma in [(0.0, 1.0), (1.0, 1.0), (-2.0, 0.5), (0.5, 3.0)]:
        lq = _gauss_log_pdf(x, mu, sigma)
        c = float(gan.value_by_quadrature(lp, lq, lp - lq, dx))
        js = distributions.density_divergences(lp, lq, dx)["js"]
        assert math.isclose(c, -math.log(4) + 2 * js, abs_tol=1e-9)
        # D* is the best discriminator: moving its logit anywhere lowers V.
        for bump in (0.3 * torch.ones_like(x), 0.5 * torch.sin(x), -0.2 * x):
            assert float(gan.value_by_quadrature(lp, lq, lp - lq + bump, dx)) < c
    with pytest.raises(ValueError, match="dx"):
        gan.value_by_quadrature(lp, lp, lp, 0.0)


def test_dirac_gan_simultaneous_steps_spiral_out_by_the_closed_form():
    h = 0.2
    path = gan.dirac_gan_trajectory(1.0, 0.5, lr=h, steps=200, mode="simultaneous")
    assert path.shape == (201, 2) and path.dtype == torch.float64
    r2 = (path**2).sum(1)
    s = torch.sigmoid(path[:-1, 0] * path[:-1, 1])
    torch.testing.assert_close(r2[1:] / r2[:-1], 1 + h**2 * s**2)   # |v'|^2 = |v|^2 (1 + h^2 s^2)
    assert r2[-1] > 2 * r2[0]


def test_dirac_gan_alternating_steps_stay_bounded_and_orbit():
    path = gan.dirac_gan_trajectory(1.0, 0.0, lr=0.2, steps=2000, mode="alternating")
    r = path.norm(dim=1)
    assert r.max() < 1.2 and r.min() > 0.8             # neither converges nor escapes
    assert (path[:, 0] < -0.5).any() and (path[:, 1] > 0.5).any()  # it goes round the origin
    ns = gan.dirac_gan_trajectory(1.0, 0.0, lr=0.2, steps=3, mode="alternating", loss="non_saturating")
    torch.testing.assert_close(ns[1], torch.tensor([1.0 + 0.2 * -0.1 * torch.sigmoid(torch.tensor(0.1)).item(), -0.1],
                                                   dtype=torch.float64))  # by hand: D first, then G
    with pytest.raises(ValueError, match="unknown mode"):
        gan.dirac_gan_trajectory(1.0, 0.0, lr=0.1, steps=3, mode="extragradient")
    with pytest.raises(ValueError, match="lr > 0"):
        gan.dirac_gan_trajectory(1.0, 0.0, lr=0.0, steps=3)


# ------------------------------------------------------------------- latent space

def test_latent_walk_moves_by_alpha_along_the_unit_direction():
    z, d = torch.randn(16), torch.randn(16)
    alphas = torch.tensor([-2.0, 0.0, 1.5])
    walk = gan.latent_walk(z, 3 * d, alphas)
    assert walk.shape == (3, 16)
    torch.testing.assert_close(walk[1], z)
    torch.testing.assert_close((walk - z).norm(dim=1), alphas.abs())
    torch.testing.assert_close(walk[2] - walk[0], 3.5 * d / d.norm())
    with pytest.raises(ValueError, match="zero vector"):
        gan.latent_walk(z, torch.zeros(16), alphas)
    with pytest.raises(ValueError, match="same size"):
        gan.latent_walk(z, torch.ones(8), alphas)


def test_principal_latent_directions_move_the_first_features_most():
    torch.manual_seed(0)
    G, _ = gan.build_dcgan(gan.DCGANConfig(latent_dim=12, g_width=4, d_width=4))
    with torch.no_grad():  # give batch norm non-trivial running statistics
        G.net[1].running_var.uniform_(0.5, 2.0)
    G.eval()
    dirs = gan.principal_latent_directions(G, k=3)
    assert dirs.shape == (3, 12)
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(3), atol=1e-5, rtol=0)
    first_block = G.net[:2]
    z = torch.randn(1, 12, 1, 1)

    def moved(d):  # how far the first (batch-normed) features move for a unit step along d
        with torch.no_grad():
            return float((first_block(z + d.reshape(1, -1, 1, 1)) - first_block(z)).norm())

    gains = [moved(d) for d in dirs]
    assert gains[0] >= gains[1] >= gains[2]
    random_dirs = torch.nn.functional.normalize(torch.randn(200, 12, generator=torch.Generator().manual_seed(1)), dim=1)
    assert gains[0] >= max(moved(d) for d in random_dirs) - 1e-5
    assert torch.all(dirs.gather(1, dirs.abs().argmax(1, keepdim=True)) > 0)  # sign convention
    with pytest.raises(ValueError, match="k must be"):
        gan.principal_latent_directions(G, k=13)


@pytest.mark.parametrize("latent_dim, width", [(100, 32), (100, 64), (100, 16)])
def test_dcgan_shapes_for_the_notebook_sizes(latent_dim, width):
    G, D = gan.build_dcgan(gan.DCGANConfig(latent_dim=latent_dim, g_width=width, d_width=width))
    shapes, x = [], torch.randn(3, latent_dim)[:, :, None, None]
    for layer in G.net:
        x = layer(x)
        if isinstance(layer, torch.nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(2 * width, 7, 7), (width, 14, 14), (1, 28, 28)]
    assert D(x).shape == (3,)
