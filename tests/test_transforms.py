"""Tests of albef_hf.data.transforms: geometry, photometry and the randomness of ALBEF's augmentation."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from albef_hf.data.transforms import (
    DEFAULT_RANDAUGMENT_OPS,
    Compose,
    RandAugment,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    apply_randaugment_op,
    build_eval_transform,
    build_train_transform,
    swap_left_right,
)

GREY = 128


def noise_image(width=48, height=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def square_image(size=32, box=(10, 12, 15, 17), value=255):
    """Black image with a bright square; box = (left, top, right, bottom), right/bottom exclusive."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = value
    return Image.fromarray(pixels)


def cv2_style_warp(pixels, forward, fill):
    """Reference for the original's cv2.warpAffine: output pixel p samples the input bilinearly at
    inverse(forward) @ p, pixel i at coordinate i. Returns the float result, a mask of the output
    pixels whose whole bilinear neighbourhood lies inside the image, and a mask of those whose
    source lies more than a pixel outside (both libraries must show the fill there; in between,
    edge handling differs)."""
    height, width = pixels.shape[:2]
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    inside = (src_x >= 0) & (src_x <= width - 2) & (src_y >= 0) & (src_y <= height - 2)
    outside = (src_x < -1) | (src_x > width) | (src_y < -1) | (src_y > height)
    x0 = np.clip(np.floor(src_x).astype(int), 0, width - 2)
    y0 = np.clip(np.floor(src_y).astype(int), 0, height - 2)
    dx, dy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    p = pixels.astype(np.float64)
    out = (
        p[y0, x0] * (1 - dx) * (1 - dy)
        + p[y0, x0 + 1] * dx * (1 - dy)
        + p[y0 + 1, x0] * (1 - dx) * dy
        + p[y0 + 1, x0 + 1] * dx * dy
    )
    out[~inside] = fill
    return out, inside, outside


# ---------------------------------------------------------------- presets, size, mode, seeding


@pytest.mark.parametrize("task", ["pretrain", "finetune", "grounding"])
def test_train_transform_gives_rgb_image_of_requested_size(task):
    transform = build_train_transform(24, task=task)
    for mode in ("RGB", "L", "RGBA"):
        out = transform(noise_image(50, 30).convert(mode), rng=1)
        assert out.mode == "RGB" and out.size == (24, 24)


def test_eval_transform_is_a_bicubic_square_resize():
    image = noise_image(50, 30)
    out = build_eval_transform(20)(image.convert("L"))
    assert out.mode == "RGB" and out.size == (20, 20)
    expected = image.convert("L").convert("RGB").resize((20, 20), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_presets_follow_the_original_per_task():
    pretrain, finetune, grounding = (
        build_train_transform(16, task=t) for t in ("pretrain", "finetune", "grounding")
    )
    assert pretrain.transforms[1].scale == (0.2, 1.0)
    assert finetune.transforms[1].scale == (0.5, 1.0)
    # grounding must keep the whole image (the referred object could be cropped away): resize only
    assert isinstance(grounding.transforms[1], Resize)
    for preset in (pretrain, finetune, grounding):
        flip, augment = preset.transforms[2:]
        assert isinstance(flip, RandomHorizontalFlip) and flip.p == 0.5
        assert (augment.num_ops, augment.magnitude, augment.prob) == (2, 7, 0.5)
        assert augment.ops == DEFAULT_RANDAUGMENT_OPS and augment.fill == (GREY,) * 3
    bare = build_train_transform(16, horizontal_flip=False, randaugment=False)
    assert [type(t) for t in bare.transforms[1:]] == [RandomResizedCrop]
    with pytest.raises(ValueError, match="unknown task"):
        build_train_transform(16, task="vqa")


def test_same_seed_same_output_and_different_seeds_differ():
    transform = build_train_transform(24)
    image = noise_image()
    outputs = [np.asarray(transform(image, rng=seed)) for seed in (3, 3, 4)]
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    # a Generator is consumed, so two calls with one generator draw different crops
    rng = np.random.default_rng(0)
    assert not np.array_equal(np.asarray(transform(image, rng)), np.asarray(transform(image, rng)))


def test_default_randomness_follows_torch_seed():
    image = noise_image()

    def run(torch_seed, seed=5, calls=3):
        # a fresh transform stands for a fresh run (or worker) of a training script
        transform = build_train_transform(24, seed=seed)
        torch.manual_seed(torch_seed)
        return [np.asarray(transform(image)) for _ in range(calls)]

    first = run(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, run(0), strict=True))
    assert not np.array_equal(first[1], first[2])  # the stream advances between calls
    assert not np.array_equal(first[0], run(1)[0])
    assert not np.array_equal(first[0], run(0, seed=6)[0])  # `seed` separates runs sharing a torch seed
    # a transform already in use switches streams when torch's seed changes (as in a new worker)
    transform = build_train_transform(24, seed=5)
    torch.manual_seed(1)
    transform(image)
    torch.manual_seed(0)
    assert np.array_equal(np.asarray(transform(image)), first[0])


class _CropBoxes(torch.utils.data.Dataset):
    """Returns the crop box that the transform's own (per-process) generator draws."""

    def __init__(self):
        self.crop = RandomResizedCrop(8)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor(self.crop.get_params(100, 100, self.crop.resolve_rng()))


def test_dataloader_workers_draw_different_augmentations():
    torch.manual_seed(0)
    loader = DataLoader(_CropBoxes(), batch_size=1, num_workers=2)
    boxes = [tuple(box[0].tolist()) for box in loader]
    # items 0 and 1 are the first draws of workers 0 and 1: a generator copied into both would repeat
    assert boxes[0] != boxes[1]
    torch.manual_seed(0)
    assert [tuple(box[0].tolist()) for box in loader] == boxes


# ---------------------------------------------------------------- RandomResizedCrop


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    crop = RandomResizedCrop(16, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    rng = np.random.default_rng(0)
    width, height = 200, 160
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = crop.get_params(width, height, rng)
        assert top >= 0 and left >= 0 and top + h <= height and left + w <= width
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    # rounding w and h to pixels moves the area and ratio by at most a pixel's worth
    assert min(areas) >= 0.2 - 0.02 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    # the area is uniform on the scale interval, minus the draws that do not fit: mean below 0.6
    assert 0.45 < np.mean(areas) < 0.6 and min(areas) < 0.25


def test_random_resized_crop_output_is_the_drawn_box_resized():
    crop = RandomResizedCrop((12, 20))
    image = noise_image(64, 48)
    top, left, h, w = crop.get_params(64, 48, np.random.default_rng(7))
    out = crop(image, rng=7)
    expected = image.crop((left, top, left + w, top + h)).resize((20, 12), Image.Resampling.BICUBIC)
    assert out.size == (20, 12)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # no crop of the allowed ratio and at least 20% of the area fits in a 1000 x 10 strip
    crop = RandomResizedCrop(8)
    assert crop.get_params(1000, 10, np.random.default_rng(0)) == ((10 - 10) // 2, (1000 - 13) // 2, 10, 13)


# ---------------------------------------------------------------- flip and text


def test_horizontal_flip_mirrors():
    image = noise_image()
    flipped = RandomHorizontalFlip(p=1.0)(image, rng=0)
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(image, rng=0) is image
    flip, rng = RandomHorizontalFlip(), np.random.default_rng(0)
    rate = np.mean([flip.get_params(rng) for _ in range(4000)])
    assert abs(rate - 0.5) < 0.04  # 5 standard deviations


def test_swap_left_right():
    assert swap_left_right("the cup left of the Right-hand plate") == "the cup right of the Left-hand plate"
    assert swap_left_right("LEFT leftmost; bright cleft") == "RIGHT rightmost; bright cleft"


# ---------------------------------------------------------------- RandAugment operations


def test_identity_is_identity():
    image = noise_image()
    assert np.array_equal(np.asarray(apply_randaugment_op(image, "Identity")), np.asarray(image))


@pytest.mark.parametrize("offset", [7.0, -7.0])
def test_translate_x_moves_content_by_minus_offset_and_fills_grey(offset):
    out = np.asarray(apply_randaugment_op(square_image(box=(10, 12, 15, 17)), "TranslateX", offset))
    shifted_left = 10 - int(offset)
    expected = np.asarray(square_image(box=(shifted_left, 12, shifted_left + 5, 17))).copy()
    uncovered = slice(32 - 7, 32) if offset > 0 else slice(0, 7)
    expected[:, uncovered] = GREY
    assert np.array_equal(out, expected)


def test_translate_y_moves_content_vertically():
    out = np.asarray(apply_randaugment_op(square_image(box=(10, 12, 15, 17)), "TranslateY", -7.0))
    expected = np.asarray(square_image(box=(10, 19, 15, 24))).copy()
    expected[:7] = GREY
    assert np.array_equal(out, expected)


def test_rotate_fills_corners_grey_and_turns_counter_clockwise():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    out = np.asarray(apply_randaugment_op(white, "Rotate", 21.0))
    for y, x in ((0, 0), (0, 31), (31, 0), (31, 31)):
        assert tuple(out[y, x]) == (GREY,) * 3
    assert tuple(out[16, 16]) == (255, 255, 255)
    # a dot right of the centre moves up (smaller y) under a positive angle
    dot = square_image(box=(26, 15, 28, 17))
    ys, xs = np.nonzero(np.asarray(apply_randaugment_op(dot, "Rotate", 30.0, fill=(0, 0, 0)))[..., 0] > 100)
    assert ys.mean() < 14 and xs.mean() < 27


@pytest.mark.parametrize(
    ("name", "arg"),
    [("Rotate", 21.0), ("Rotate", -21.0), ("ShearX", 0.21), ("ShearY", -0.21), ("TranslateX", 7.0)],
)
def test_geometric_ops_reproduce_the_original_sampling_positions(name, arg):
    # On noise, any sub-pixel offset between the two mappings would change pixels by tens of levels.
    pixels = np.asarray(noise_image(40, 36))
    height, width = pixels.shape[:2]
    cos, sin = math.cos(math.radians(arg)), math.sin(math.radians(arg))
    forward = {
        # cv2.getRotationMatrix2D((W / 2, H / 2), angle, 1), written out
        "Rotate": [
            [cos, sin, (1 - cos) * width / 2 - sin * height / 2],
            [-sin, cos, sin * width / 2 + (1 - cos) * height / 2],
        ],
        "ShearX": [[1, arg, 0], [0, 1, 0]],
        "ShearY": [[1, 0, 0], [arg, 1, 0]],
        "TranslateX": [[1, 0, -arg], [0, 1, 0]],
    }[name]
    expected, inside, outside = cv2_style_warp(pixels, np.array(forward, dtype=np.float64), GREY)
    out = np.asarray(apply_randaugment_op(Image.fromarray(pixels), name, arg)).astype(np.float64)
    assert inside.mean() > 0.5 and outside.any()
    assert np.abs(out - expected)[inside].max() < 1 + 1e-6  # PIL rounds to integers
    assert (out[outside] == GREY).all()


def test_brightness_scales_pixel_values():
    pixels = np.asarray(noise_image())
    out = np.asarray(apply_randaugment_op(Image.fromarray(pixels), "Brightness", 1.36)).astype(int)
    expected = np.clip(np.floor(pixels * 1.36), 0, 255)
    assert np.abs(out - expected).max() <= 1
    assert (out[pixels > 200] == 255).all()


def test_sharpness_sharpens_edges_and_keeps_border_and_flat_areas():
    # a soft vertical edge: dark | grey ramp | bright
    row = np.concatenate([np.full(10, 60), np.linspace(60, 200, 6), np.full(10, 200)]).astype(np.uint8)
    pixels = np.repeat(np.repeat(row[None, :, None], 20, axis=0), 3, axis=2)
    out = np.asarray(apply_randaugment_op(Image.fromarray(pixels), "Sharpness", 1.8)).astype(int)
    assert np.array_equal(out[0], pixels[0]) and np.array_equal(out[:, 0], pixels[:, 0])  # border kept
    assert np.array_equal(out[5:15, 2:7], pixels[5:15, 2:7])  # flat stays flat
    # overshoot on both sides of the ramp: darker than the dark side, brighter than the bright side
    assert out[10, 8:18, 0].min() < 60 and out[10, 8:18, 0].max() > 200


def test_autocontrast_stretches_each_channel_to_full_range():
    rng = np.random.default_rng(0)
    pixels = np.stack(
        [rng.integers(100, 121, (16, 16)), rng.integers(30, 61, (16, 16)), np.full((16, 16), 90)], -1
    )
    out = np.asarray(apply_randaugment_op(Image.fromarray(pixels.astype(np.uint8)), "AutoContrast")).astype(
        int
    )
    for channel in (0, 1):
        assert out[..., channel].min() == 0 and out[..., channel].max() == 255
    assert (out[..., 2] == 90).all()  # a constant channel has nothing to stretch
    # order preserved within a channel
    flat_in, flat_out = pixels[..., 0].ravel(), out[..., 0].ravel()
    assert np.all(np.diff(flat_out[np.argsort(flat_in, kind="stable")]) >= 0)


def test_equalize_flattens_the_histogram():
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(120, 6, (32, 32, 3)), 0, 255).astype(np.uint8)
    out = np.asarray(apply_randaugment_op(Image.fromarray(pixels), "Equalize"))
    assert out.min() < 20 and out.max() > 235
    # the cumulative histogram of an equalized image is close to a straight line
    cdf = np.cumsum(np.bincount(out[..., 0].ravel(), minlength=256)) / out[..., 0].size
    assert np.abs(cdf - np.linspace(0, 1, 256)).max() < 0.1
    assert (
        np.abs(
            np.cumsum(np.bincount(pixels[..., 0].ravel(), minlength=256)) / 1024 - np.linspace(0, 1, 256)
        ).max()
        > 0.3
    )


def test_unknown_op_and_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown RandAugment operation"):
        apply_randaugment_op(noise_image(), "Solarize", 1.0)
    with pytest.raises(ValueError, match="subset"):
        RandAugment(ops=["Identity", "Posterize"])
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=11)


# ---------------------------------------------------------------- RandAugment sampling


def test_randaugment_sampling_follows_the_original():
    augment, rng, draws = RandAugment(), np.random.default_rng(0), 20000
    plans = [augment.get_params(rng) for _ in range(draws)]
    # 2 ops kept with probability 0.5 each: 0, 1, 2 ops with probability 1/4, 1/2, 1/4
    kept = Counter(len(plan) for plan in plans)
    for count, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(kept[count] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws)
    ops = [op for plan in plans for op in plan]
    names = Counter(name for name, _ in ops)
    assert set(names) == set(DEFAULT_RANDAUGMENT_OPS)
    for name in DEFAULT_RANDAUGMENT_OPS:  # uniform choice
        assert abs(names[name] / len(ops) - 0.1) < 5 * math.sqrt(0.09 / len(ops))
    # magnitude 7 of 10: the original's parameters, signs balanced for the geometric ops only
    magnitudes = {"Brightness": 1.36, "Sharpness": 1.36, "ShearX": 0.21, "ShearY": 0.21}
    magnitudes |= {"TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}
    signs = []
    for name, arg in ops:
        if name in magnitudes:
            assert abs(abs(arg) - magnitudes[name]) < 1e-9
            if name not in ("Brightness", "Sharpness"):
                signs.append(arg > 0)
            else:
                assert arg > 0
        else:
            assert arg is None
    assert abs(np.mean(signs) - 0.5) < 5 * math.sqrt(0.25 / len(signs))


def test_randaugment_draws_ops_with_replacement():
    # with every op kept, the two names coincide with probability 1/10 (never, if drawn without replacement)
    augment, rng = RandAugment(prob=1.0), np.random.default_rng(1)
    repeats = np.mean([len({name for name, _ in augment.get_params(rng)}) == 1 for _ in range(5000)])
    assert abs(repeats - 0.1) < 5 * math.sqrt(0.09 / 5000)


def test_randaugment_call_applies_its_plan():
    augment, image = RandAugment(num_ops=3, prob=0.9), noise_image()
    for seed in range(5):
        expected = image
        for name, arg in augment.get_params(np.random.default_rng(seed)):
            expected = apply_randaugment_op(expected, name, arg, augment.fill)
        assert np.array_equal(np.asarray(augment(image, rng=seed)), np.asarray(expected))


def test_compose_shares_one_generator_and_calls_plain_functions():
    calls = []
    compose = Compose([RandomHorizontalFlip(p=1.0), lambda image: calls.append(image.size) or image])
    out = compose(noise_image(10, 6), rng=0)
    assert calls == [(10, 6)] and out.size == (10, 6)
