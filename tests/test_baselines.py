"""Classical baselines: the pseudo-inverse and TV reconstructions through deepinv."""

import torch

from invdiff.baselines import best_tv_reconstruction, pseudo_inverse, tv_reconstruction
from invdiff.metrics import psnr
from invdiff.operators import GaussianNoise, inpainting, random_mask, super_resolution


def piecewise_constant_image():
    image = torch.full((1, 1, 16, 16), 0.2)
    image[..., 4:12, 3:9] = 0.8
    return image


def test_pseudo_inverse_keeps_observed_pixels_and_tv_fills_the_rest():
    truth = piecewise_constant_image()
    mask = random_mask((1, 16, 16), 0.5, seed=0)
    operator = inpainting((1, 16, 16), GaussianNoise(0.01), mask=mask)
    measurement = operator.noise.sample(operator.physics.A(truth), torch.Generator().manual_seed(0))
    inverse = pseudo_inverse(operator, measurement)
    observed = mask.bool().expand_as(truth)
    assert torch.allclose(inverse[observed], measurement.clamp(0, 1)[observed])
    assert (inverse[~observed] == 0).all()
    tv = tv_reconstruction(operator, measurement, regularisation=0.01, iterations=100)
    assert psnr(tv, truth) > psnr(inverse, truth) + 5


def test_best_tv_reconstruction_picks_the_best_regularisation_of_the_grid():
    truth = piecewise_constant_image()
    operator = super_resolution((1, 16, 16), GaussianNoise(0.01), factor=2)
    measurement = operator.noise.sample(operator.physics.A(truth), torch.Generator().manual_seed(0))
    grid = (1e-4, 1e-2, 1.0)
    best, chosen = best_tv_reconstruction(operator, measurement, truth, grid, iterations=50)
    scores = {value: psnr(tv_reconstruction(operator, measurement, value, iterations=50), truth) for value in grid}
    assert chosen == max(scores, key=scores.get) and psnr(best, truth) == scores[chosen]
    assert psnr(best, truth) > psnr(pseudo_inverse(operator, measurement), truth)
