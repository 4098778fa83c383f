"""Batched (device) and per-image (albumentations) augmentation: shapes, ranges, determinism and
the pixel operations against reference implementations (PIL, OpenCV, numpy)."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from src.augment import (GpuAugment, StrongAugment, adjust_brightness, adjust_contrast, adjust_hue,
                         adjust_saturation, cpu_pipeline, cutout, gaussian_blur, posterize, strong_augment,
                         to_device_views, view_loader, weak_augment)
from src.errors import UserError
from src.models.encoder import MEAN, STD, to_input




@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))


def unnormalise(x):
    """Normalised (B, 3, H, W) -> 0..255 float (B, 3, H, W)."""
    return x * STD + MEAN


def test_gpu_augment_shapes_ranges_and_determinism(images):
    lo = to_input(torch.zeros(1, 1, 1, 3, dtype=torch.uint8))
    hi = to_input(torch.full((1, 1, 1, 3), 255, dtype=torch.uint8))
    for aug in (GpuAugment(32, blur_p=0.5, solarize_p=0.5), GpuAugment(16, crop_scale=(0.05, 0.3)),
                weak_augment(32), strong_augment(32)):
        out = aug(images, torch.Generator().manual_seed(1))
        assert out.shape == (12, 3, aug.image_size, aug.image_size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out >= lo.view(1, 3, 1, 1) - 1e-4).all() and (out <= hi.view(1, 3, 1, 1) + 1e-4).all()
        again = aug(images, torch.Generator().manual_seed(1))
        other = aug(images, torch.Generator().manual_seed(2))
        assert torch.equal(out, again)
        assert not torch.equal(out, other)


def test_channels_last_output(images):
    out = GpuAugment(32, channels_last=True)(images)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_identity_settings_return_the_normalised_input(images):
    aug = GpuAugment(32, crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=0.0)
    assert torch.allclose(aug(images), to_input(images), atol=1e-5)


def test_flip_only_gives_image_or_its_mirror(images):
    out = GpuAugment(32, crop_scale=None, flip=True, color_jitter=0.0, grayscale_p=0.0)(
        images, torch.Generator().manual_seed(0))
    ref = to_input(images)
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-4
    mirrored = (out - ref.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_weak_augment_is_an_integer_shift_with_symmetric_padding(images):
    """Every weak view equals a crop of the 4-px symmetric-padded image (or of its mirror)."""
    out = unnormalise(weak_augment(32)(images, torch.Generator().manual_seed(3)))
    x = images.permute(0, 3, 1, 2).float().numpy()
    for i in range(len(x)):
        found = False
        for img in (x[i], x[i][:, :, ::-1]):
            padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="symmetric")
            for dy in range(9):
                for dx in range(9):
                    if np.abs(padded[:, dy:dy + 32, dx:dx + 32] - out[i].numpy()).max() < 1e-2:
                        found = True
        assert found, f"sample {i} is not a shifted copy"


def test_grayscale_and_solarize(images):
    gray = unnormalise(GpuAugment(32, crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=1.0)(images))
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-3) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-3)
    sol = unnormalise(GpuAugment(32, crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=0.0,
                                 solarize_p=1.0)(images))
    x = images.permute(0, 3, 1, 2).float()
    expected = torch.where(x >= 127.5, 255 - x, x)
    assert torch.allclose(sol, expected, atol=1e-3)


@pytest.mark.parametrize("op,enhance", [(adjust_brightness, ImageEnhance.Brightness),
                                        (adjust_contrast, ImageEnhance.Contrast),
                                        (adjust_saturation, ImageEnhance.Color)])
def test_colour_ops_match_pil(images, op, enhance):
    x = images.permute(0, 3, 1, 2).float() / 255
    factors = torch.tensor([0.3, 1.0, 1.6] * 4)
    out = op(x, factors) * 255
    for i in range(len(x)):
        ref = np.asarray(enhance(Image.fromarray(images[i].numpy())).enhance(float(factors[i]))).astype(np.float32)
        # PIL rounds to uint8 and computes the contrast mean in integers: allow a few levels.
        assert np.abs(out[i].permute(1, 2, 0).numpy() - ref).max() <= 3.0


def test_hue_shift_properties(images):
    x = images.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(adjust_hue(x, torch.zeros(len(x))), x, atol=1e-5)  # zero shift: identity
    gray = x.mean(1, keepdim=True).expand_as(x)
    assert torch.allclose(adjust_hue(gray, torch.full((len(x),), 0.3)), gray, atol=1e-4)  # no chroma to rotate
    red = torch.zeros(2, 3, 1, 1)
    red[:, 0] = 1.0
    turned = adjust_hue(red * 0.5 + 0.25, torch.tensor([1 / 3, -1 / 3])).flatten(1)  # HSV: red -> green / blue
    assert turned[0].argmax() == 1 and turned[1].argmax() == 2


def test_gaussian_blur_matches_opencv(images):
    x = images.permute(0, 3, 1, 2).float() / 255
    sigmas = torch.linspace(0.3, 2.0, len(x))
    out = gaussian_blur(x, sigmas, 5)
    for i in range(len(x)):
        ref = cv2.GaussianBlur(x[i].permute(1, 2, 0).numpy(), (5, 5), float(sigmas[i]),
                               borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(out[i].permute(1, 2, 0).numpy() - ref).max() < 1e-5


def test_posterize_and_cutout(images):
    x = images.permute(0, 3, 1, 2).float() / 255
    bits = torch.full((len(x),), 3)
    ref = (images.permute(0, 3, 1, 2).to(torch.int32) & 0b11100000).float() / 255
    assert torch.allclose(posterize(x, bits), ref, atol=1e-6)
    cut = cutout(x, torch.full((len(x),), 0.5), torch.Generator().manual_seed(0), fill=0.5)
    filled = ((cut == 0.5).all(1)).flatten(1).sum(1)  # pixels set to the fill value, per image
    assert (filled >= 8 * 8 - 2 * 16).all() and (filled <= 16 * 16).all()


def test_strong_augment_changes_images(images):
    out = StrongAugment(32, n_ops=2)(images, torch.Generator().manual_seed(0))
    assert (out - to_input(images)).abs().flatten(1).amax(1).min() > 0.1


def test_cpu_pipelines_and_loader(images):
    arr = images.numpy()
    for kind in ("ssl", "weak", "strong"):
        tf = cpu_pipeline(kind, 32, blur_p=1.0, solarize_p=0.5, seed=0)
        y = tf(image=arr[0])["image"]
        assert y.shape == (32, 32, 3) and y.dtype == np.uint8
    with pytest.raises(UserError, match="augmentation kind 'nope'"):
        cpu_pipeline("nope", 32)
    tf = cpu_pipeline("ssl", 32, seed=0)
    loader = view_loader(arr, [tf, tf, cpu_pipeline("ssl", 16, seed=1)], batch_size=4, device=torch.device("cpu"))
    views = to_device_views(next(iter(loader)), torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 16, 16)]
    assert len(loader) == 3  # drop_last: 12 images / 4


def test_rotation_moves_a_dot_along_a_circle():
    """rotate_deg=30: a bright dot 12 px right of the centre stays 12 px away, within 30 degrees."""
    img = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    img[:, 15:17, 27:29] = 255  # centre of the dot: (16, 28) in pixel edges -> (0, +12) from the centre
    out = unnormalise(GpuAugment(32, crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=0.0,
                                 rotate_deg=30)(img, torch.Generator().manual_seed(0)))[:, 0]
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5 - 16, torch.arange(32) + 0.5 - 16, indexing="ij")
    w = out / out.sum(dim=(1, 2), keepdim=True)
    cy, cx = (w * ys).sum(dim=(1, 2)), (w * xs).sum(dim=(1, 2))
    radius, angle = torch.hypot(cx, cy), torch.rad2deg(torch.atan2(cy, cx))
    assert torch.allclose(radius, torch.full_like(radius, 12.0), atol=0.5)
    assert angle.abs().max() <= 30.5 and angle.abs().max() > 15  # spread over the range, not a no-op
