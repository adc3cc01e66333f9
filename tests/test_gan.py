import dataclasses
import math

import numpy as np
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


def test_losses_refuse_an_empty_batch():
    empty, some = torch.zeros(0), torch.zeros(3)
    for call in (lambda: gan.discriminator_loss(empty, some), lambda: gan.discriminator_loss(some, empty),
                 lambda: gan.value_function(empty, some), lambda: gan.generator_loss(empty),
                 lambda: gan.generator_loss(empty, "saturating")):
        with pytest.raises(ValueError, match="empty"):
            call()


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


def test_dcgan_discriminator_gives_one_logit_per_image_and_refuses_other_sizes():
    cfg = gan.DCGANConfig(latent_dim=8, g_width=4, d_width=4)
    _, D = gan.build_dcgan(cfg)
    D.eval()                          # batch norm on running statistics: each image alone
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = D(x)
        alone = torch.cat([D(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone)
    for bad in (torch.zeros(2, 1, 32, 32), torch.zeros(1, 28, 28), torch.zeros(2, 3, 28, 28)):
        with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
            D(bad)                    # two 32x32 images would give 8 logits
    G, _ = gan.build_dcgan(cfg)
    with pytest.raises(ValueError, match="codes of shape"):
        G(torch.zeros(2, 8, 1, 1))


def test_mlp_gan_is_per_example_and_refuses_inputs_without_a_batch_axis():
    cfg = gan.MLPGANConfig(hidden=16, depth=2)
    G, D = gan.build_mlp_gan(cfg)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # no layer mixes examples: each row's logit is the row's alone
        torch.testing.assert_close(D(x), torch.cat([D(x[i:i + 1]) for i in range(6)]))
        torch.testing.assert_close(G(x), torch.cat([G(x[i:i + 1]) for i in range(6)]))
    with pytest.raises(ValueError, match=r"points of shape \(B, 2\)"):
        D(x[0])                       # one point without its batch axis used to give a scalar
    with pytest.raises(ValueError, match=r"codes of shape \(B, 2\)"):
        G(torch.zeros(4, 3))


def test_configs_validate_their_fields_and_accept_numpy_numbers(tmp_path):
    bad_fields = [(dict(latent_dim=0), "latent_dim"), (dict(hidden=2.5), "hidden"),
                  (dict(lr=-1.0), "lr"), (dict(beta1=1.0), "beta1"),
                  (dict(loss="wasserstein"), "loss"), (dict(seed=-1), "seed")]
    for bad, field in bad_fields:
        with pytest.raises(ValueError, match=f"MLPGANConfig.{field}"):
            gan.MLPGANConfig(**bad)
        dc_bad = {("g_width" if k == "hidden" else k): v for k, v in bad.items()}
        with pytest.raises(ValueError, match=f"DCGANConfig.{field.replace('hidden', 'g_width')}"):
            gan.DCGANConfig(**dc_bad)
    cfg = gan.DCGANConfig(latent_dim=np.int64(8), g_width=np.int32(4), d_width=4, lr=np.float64(1e-3))
    assert type(cfg.latent_dim) is int and type(cfg.g_width) is int and type(cfg.lr) is float
    G, D = gan.build_dcgan(cfg)
    path = training.save_checkpoint(tmp_path / "g.pt", {"generator": G}, config=cfg)
    assert training.load_checkpoint(path, config_type=gan.DCGANConfig).config == cfg


def test_initial_weights_depend_only_on_the_config_seed():
    cfg = gan.DCGANConfig(latent_dim=8, g_width=4, d_width=4, seed=3)

    def weights(pair):
        return [p.detach().clone() for net in pair for p in net.parameters()]

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = weights(gan.build_dcgan(cfg))
    assert torch.equal(torch.rand(1), before)            # the global RNG was not touched
    torch.manual_seed(999)                              # another global state: same weights
    assert all(torch.equal(x, y) for x, y in zip(a, weights(gan.build_dcgan(cfg))))
    other = weights(gan.build_dcgan(dataclasses.replace(cfg, seed=4)))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    mlp = gan.MLPGANConfig(hidden=8, depth=1, seed=2)
    m1, m2 = weights(gan.build_mlp_gan(mlp)), weights(gan.build_mlp_gan(mlp))
    assert all(torch.equal(x, y) for x, y in zip(m1, m2))


def test_train_step_takes_the_generator_loss_from_the_config():
    g = torch.Generator().manual_seed(0)
    x, _ = data.ring_of_gaussians(256, modes=8, radius=2.0, std=0.05, generator=g)
    for loss in ("saturating", "non_saturating"):
        cfg = gan.MLPGANConfig(hidden=16, depth=1, loss=loss)
        G, D = gan.build_mlp_gan(cfg)
        opt_g, opt_d = gan.adam_pair(G, D, cfg.lr, cfg.beta1)
        step = gan.make_train_step(G, D, opt_g, opt_d, generator=torch.Generator().manual_seed(1))
        out = [step((x[i:i + 64],)) for i in range(0, 256, 64)]
        # J_G = E log(1 - D) < 0 (saturating) and J_G = -E log D > 0 (non-saturating), always
        assert all((o["loss_g"] < 0) == (loss == "saturating") for o in out), (loss, out)


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


def test_slerp_walks_the_circle_at_constant_speed():
    # Unit vectors in the plane at angles a and b: slerp at t is the unit vector at angle
    # a + t (b - a), for angles between them from tiny to nearly pi.
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    for a, b in [(0.3, 1.9), (-2.0, 1.0), (0.0, 3.1), (1.0, 1.0 + 1e-7)]:
        unit = lambda angle: torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        expected = torch.stack([unit(a + float(s) * (b - a)) for s in t])
        torch.testing.assert_close(gan.slerp(unit(a), unit(b), t), expected, rtol=0, atol=1e-12)


def test_slerp_handles_parallel_codes_and_refuses_undefined_ones():
    z = torch.randn(100, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 5)
    same = gan.slerp(z, z.clone(), t)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same, z.expand(5, -1))
    torch.testing.assert_close(gan.slerp(z, 3 * z, t), (1 - t)[:, None] * z + t[:, None] * (3 * z))
    with pytest.raises(ValueError, match="zero vector"):
        gan.slerp(z, torch.zeros(100), t)                # used to return NaN
    with pytest.raises(ValueError, match="zero vector"):
        gan.slerp(torch.zeros(100), z, t)
    with pytest.raises(ValueError, match="opposite"):
        gan.slerp(z, -2 * z, t)                          # used to divide by sin(pi) ~ 1e-8
    with pytest.raises(ValueError, match="same size"):
        gan.slerp(z, z[:50], t)


def test_tiny_gan_covers_more_modes_after_training():
    g = torch.Generator().manual_seed(0)
    x, centers = data.ring_of_gaussians(4096, modes=8, radius=2.0, std=0.05, generator=g)
    cfg = gan.MLPGANConfig(hidden=64, depth=2, lr=2e-3)
    G, D = gan.build_mlp_gan(cfg)
    opt_g, opt_d = gan.adam_pair(G, D, cfg.lr, cfg.beta1)

    def coverage():
        with torch.no_grad():
            s = G(torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
        return metrics.mode_coverage(s, centers, std=0.05, threshold=4.0)

    before = coverage()
    step = gan.make_train_step(G, D, opt_g, opt_d, generator=g)
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


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_dcgan_of_each_profile_follows_the_size_formulas_and_the_parameter_count(profile):
    sizes = gan.DCGAN_SIZES[profile]
    cfg = gan.DCGANConfig(g_width=sizes["g_width"], d_width=sizes["d_width"])
    G, D = gan.build_dcgan(cfg)
    Z, g, d, C = cfg.latent_dim, cfg.g_width, cfg.d_width, cfg.channels
    # Output sizes: (n - 1) s - 2p + k for a transposed convolution, (n + 2p - k) // s + 1
    # for a convolution, from each layer's own kernel, stride and padding.
    for net, first, formula in [(G.net, 1, lambda n, k, s, p: (n - 1) * s - 2 * p + k),
                                (D.net, 28, lambda n, k, s, p: (n + 2 * p - k) // s + 1)]:
        convs = [m for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        inputs = torch.zeros(2, Z) if net is G.net else torch.zeros(2, C, 28, 28)
        shapes = training.layer_shapes(G if net is G.net else D, inputs,
                                       {str(i): m for i, m in enumerate(convs)})
        n = first
        for i, m in enumerate(convs):
            n = formula(n, m.kernel_size[0], m.stride[0], m.padding[0])
            assert shapes[str(i)] == (2, m.out_channels, n, n)
        assert n == (28 if net is G.net else 1)
    # Parameter counts in closed form (kernels 7x7 and 4x4, biases only where no batch norm
    # follows, two numbers per batch-norm channel).
    n_g = Z * 2 * g * 49 + 2 * 2 * g + 2 * g * g * 16 + 2 * g + g * C * 16 + C
    n_d = C * d * 16 + d + d * 2 * d * 16 + 2 * 2 * d + 2 * d * 49 + 1
    assert sum(p.numel() for p in G.parameters()) == n_g
    assert sum(p.numel() for p in D.parameters()) == n_d


# ------------------------------------------------------------- other sizes, in colour

def test_resolution_levels_halve_to_the_coarsest_side_and_refuse_other_sizes():
    assert gan.resolution_levels(28) == (7, 14, 28)
    assert gan.resolution_levels(32) == (4, 8, 16, 32)
    assert gan.resolution_levels(64) == (4, 8, 16, 32, 64)
    assert gan.resolution_levels(8) == (4, 8)
    assert gan.resolution_levels(np.int64(12)) == (3, 6, 12)
    for bad in (30, 9, 4, 2, 0, -32, 32.0, True):     # 30 -> 15 and 9 -> 9 stop above 7
        with pytest.raises(ValueError, match="image_size"):
            gan.resolution_levels(bad)
    with pytest.raises(ValueError, match="DCGANConfig.image_size"):
        gan.DCGANConfig(image_size=30)


@pytest.mark.parametrize("cfg", [gan.DCGANConfig(latent_dim=10, channels=3, image_size=size, g_width=4, d_width=4)
                                 for size in (32, 64, 8)]
                         + [gan.DCGAN_OPENMOJI_SIZES[profile]["model"] for profile in ("smoke", "cpu", "gpu")])
def test_dcgan_at_other_sizes_in_colour_follows_the_size_formulas_and_parameter_count(cfg, tmp_path):
    image_size = cfg.image_size
    G, D = gan.build_dcgan(cfg)
    Z, g, d, C = cfg.latent_dim, cfg.g_width, cfg.d_width, cfg.channels
    sides = gan.resolution_levels(image_size)         # e.g. 4 -> 8 -> 16 -> 32
    n, b = len(sides) - 1, sides[0]
    for net, inputs, expected in [
            (G, torch.zeros(2, Z), [(2, g * 2 ** (n - 1 - i), s, s) for i, s in enumerate(sides[:-1])]
             + [(2, C, image_size, image_size)]),
            (D, torch.zeros(2, C, image_size, image_size),
             [(2, d * 2 ** i, s, s) for i, s in enumerate(sides[-2::-1])] + [(2, 1, 1, 1)])]:
        convs = [m for m in net.net if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        shapes = training.layer_shapes(net, inputs, {str(i): m for i, m in enumerate(convs)})
        assert [shapes[str(i)] for i in range(len(convs))] == expected
    # Parameters in closed form: a b x b kernel at the coarse end, 4x4 kernels elsewhere,
    # biases only where no batch norm follows, two numbers per batch-norm channel.
    gw = [g * 2 ** (n - 1 - i) for i in range(n)]     # generator widths, coarse to fine
    n_g = (Z * gw[0] * b * b + 2 * gw[0] + sum(a * c * 16 + 2 * c for a, c in zip(gw, gw[1:]))
           + g * C * 16 + C)
    dw = [d * 2 ** i for i in range(n)]               # discriminator widths, fine to coarse
    n_d = C * d * 16 + d + sum(a * c * 16 + 2 * c for a, c in zip(dw, dw[1:])) + dw[-1] * b * b + 1
    assert sum(p.numel() for p in G.parameters()) == n_g
    assert sum(p.numel() for p in D.parameters()) == n_d
    x = G(torch.randn(5, Z))
    assert x.shape == (5, 3, image_size, image_size) and D(x).shape == (5,)
    with pytest.raises(ValueError, match=rf"\(B, 3, {image_size}, {image_size}\)"):
        D(torch.zeros(2, 3, 28, 28))
    path = training.save_checkpoint(tmp_path / "g.pt", {"generator": G}, config=cfg)
    assert training.load_checkpoint(path, config_type=gan.DCGANConfig).config == cfg


def test_tiny_colour_dcgan_learns_one_batch_at_32x32():
    # Eight discs of random colours on white: after training on them alone, the generator's
    # samples lie near them, and each of them has a sample near it.
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    images = torch.ones(8, 3, 32, 32)
    for image in images:
        cx, cy = torch.randint(8, 24, (2,), generator=g).tolist()
        image[:, (xx - cx) ** 2 + (yy - cy) ** 2 <= int(torch.randint(4, 9, (1,), generator=g)) ** 2] = \
            torch.rand(3, 1, generator=g)
    x = gan.to_tanh_range(images)
    cfg = gan.DCGANConfig(latent_dim=8, channels=3, image_size=32, g_width=8, d_width=8, lr=2e-3)
    G, D = gan.build_dcgan(cfg)
    opt_g, opt_d = gan.adam_pair(G, D, cfg.lr, cfg.beta1)

    def distances() -> tuple[float, float]:
        s = gan.sample(G, 64, generator=torch.Generator().manual_seed(1)).flatten(1)
        pairwise = torch.cdist(s, x.flatten(1))                    # (64 samples, 8 images)
        return float(pairwise.min(1).values.mean()), float(pairwise.min(0).values.mean())

    to_batch_before, to_sample_before = distances()
    step = gan.make_train_step(G, D, opt_g, opt_d, generator=torch.Generator().manual_seed(0))
    training.train(step, training.minibatches(x, batch_size=8), 300, progress=False)
    to_batch, to_sample = distances()
    # about 52 -> 23 and 53 -> 22 (from 19 to 24 with model seeds 0-3: GAN training is noisy)
    assert to_batch < 0.6 * to_batch_before, (to_batch_before, to_batch)
    assert to_sample < 0.6 * to_sample_before, (to_sample_before, to_sample)



# ------------------------------------------------------------------------ the recipe

# the shipped recipe's data and network at a size that trains in a fraction of a second
TINY_RECIPE = gan.GANRecipe(model=gan._openmoji_dcgan(4), steps=3, batch_size=8)


def test_gan_recipe_validates_its_fields_and_its_fit_to_the_data(tmp_path):
    assert gan.GANRecipe().model == gan.DCGAN_OPENMOJI_SIZES["cpu"]["model"]
    assert gan.GAN_RECIPE.model.lr == 5e-4 and gan.GAN_RECIPE.model.channels == 3
    for bad, field in [(dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(seed=-1), "seed"),
                       (dict(seed=1.5), "seed")]:
        with pytest.raises(ValueError, match=f"GANRecipe.{field}"):
            dataclasses.replace(TINY_RECIPE, **bad)
    with pytest.raises(TypeError, match="DCGANConfig"):
        dataclasses.replace(TINY_RECIPE, model="small")
    with pytest.raises(ValueError, match="or image_size=32"):         # says which argument fixes it
        dataclasses.replace(TINY_RECIPE, image_size=64)
    with pytest.raises(ValueError, match=r"channels=3\)"):
        dataclasses.replace(TINY_RECIPE, model=dataclasses.replace(TINY_RECIPE.model, channels=1))
    with pytest.raises(ValueError, match=r"channels=1\)"):
        gan.GANRecipe(model=gan.DCGANConfig(channels=3, image_size=28), dataset="mnist5k", image_size=28)
    # a recipe round-trips through a checkpoint (its nested config comes back as a DCGANConfig)
    path = training.save_checkpoint(tmp_path / "r.pt", {}, config=gan.GAN_RECIPE)
    back = training.load_checkpoint(path, config_type=gan.GANRecipe).config
    assert back == gan.GAN_RECIPE and isinstance(back.model, gan.DCGANConfig)


def _states(*modules):
    return [t for m in modules for t in m.state_dict().values()]


def test_train_recipe_is_deterministic_and_resumes_exactly(tmp_path):
    G, D, history = gan.train_recipe(TINY_RECIPE, progress=False)
    assert history.step == 3 and sorted(history.keys()) == ["d_fake", "d_real", "loss_d", "loss_g"]
    assert list(history.series("loss_d")[0]) == [1, 2, 3]
    G2, D2, history2 = gan.train_recipe(TINY_RECIPE, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_states(G, D), _states(G2, D2)))
    assert history2.records == history.records
    # the same run in two sittings: 1 step, then resumed from the checkpoint up to 3
    path = tmp_path / "run.pt"
    gan.train_recipe(dataclasses.replace(TINY_RECIPE, steps=1), checkpoint=str(path), progress=False)
    assert training.load_checkpoint(path, config_type=gan.GANRecipe).history.step == 1
    G3, D3, history3 = gan.train_recipe(TINY_RECIPE, checkpoint=str(path), save_every=2, progress=False)
    assert history3.step == 3 and history3.records == history.records
    assert all(torch.equal(a, b) for a, b in zip(_states(G, D), _states(G3, D3)))
    stored = training.load_checkpoint(path, config_type=gan.GANRecipe)
    assert stored.config == TINY_RECIPE and stored.history.step == 3
    # the shipped part is the generator: build_gan gives the same network to load it into
    G4 = gan.build_gan(TINY_RECIPE)
    training.load_checkpoint(path, {"generator": G4})
    assert all(torch.equal(a, b) for a, b in zip(_states(G), _states(G4)))
    # the run depends on the seed, and training moved the weights
    G5, _, _ = gan.train_recipe(dataclasses.replace(TINY_RECIPE, seed=1), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(_states(G), _states(G5)))
    assert not all(torch.equal(a, b) for a, b in zip(_states(G), _states(gan.build_gan(TINY_RECIPE))))


def test_train_recipe_refuses_a_checkpoint_of_another_recipe(tmp_path):
    path = tmp_path / "run.pt"
    gan.train_recipe(dataclasses.replace(TINY_RECIPE, steps=1), checkpoint=str(path), progress=False)
    with pytest.raises(ValueError, match="another recipe"):
        gan.train_recipe(dataclasses.replace(TINY_RECIPE, seed=1), checkpoint=str(path), progress=False)
    with pytest.raises(ValueError, match="save_every"):
        gan.train_recipe(TINY_RECIPE, checkpoint=str(path), save_every=0, progress=False)
