"""Grad-CAM on the Flax ResNet: shape and range, agreement with CAM, localisation of a patch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from isic_jax.data import image_ops
from isic_jax.evaluation import gradcam
from isic_jax.models import BasicBlock, ResNet, create_model, init_variables

SIZE = 80  # >= 65 px: smaller inputs hit a slow XLA:CPU convolution path (models/resnet.py)


@pytest.fixture(scope="module")
def tiny():
    """resnet_tiny (width 8, 2 classes), random init: (model, variables)."""
    model = create_model(ml_collections.ConfigDict({"name": "resnet_tiny", "width": 8}), 2)
    return model, init_variables(model, jax.random.key(0), SIZE)


def _signed_head(variables):
    """The head with W[:, 0] = -W[:, 1]: at random init one class's weighted feature sum can be
    negative everywhere (an all-zero map); opposite weights give both classes evidence somewhere."""
    params = dict(variables["params"])
    kernel = params["head"]["kernel"]
    params["head"] = {**params["head"], "kernel": kernel.at[:, 0].set(-kernel[:, 1])}
    return {**variables, "params": params}


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, 3)), np.float32)


def test_cam_layer_is_the_last_block():
    params = {
        "stem_conv": 0,
        "stage1_block1": 0,
        "stage2_block2": 0,
        "stage10_block1": 0,
        "stage2_block1": 0,
        "head": 0,
    }
    model = ResNet(stage_sizes=(1,) * 10, block_cls=BasicBlock, num_classes=2)
    assert model.cam_layer(params) == "stage10_block1"
    with pytest.raises(ValueError):
        model.cam_layer({"head": 0})


def test_shape_range_and_class_dependence(tiny):
    model, variables = tiny
    variables = _signed_head(variables)
    x = _images(3)
    h1 = gradcam.grad_cam(model, variables, x, 1)
    h0 = gradcam.grad_cam(model, variables, x, 0)
    for h in (h0, h1):
        assert h.shape == (3, SIZE, SIZE) and h.dtype == np.float32
        assert np.all(np.isfinite(h))
        assert h.min() >= 0.0 and h.max() <= 1.0
    # Normalised per image: each non-empty map peaks at 1, and the map is not constant.
    for h in (h0, h1):
        np.testing.assert_allclose(h.max(axis=(1, 2)), 1.0, atol=1e-6)
        assert h.std(axis=(1, 2)).min() > 0.05
    # Opposite weights: at feature-map resolution the two maps have disjoint supports
    # (ReLU(s) vs ReLU(-s)), and upsampled they are anti-correlated.
    low0, low1 = (gradcam.grad_cam(model, variables, x, c, resize=False) for c in (0, 1))
    assert np.all(low0 * low1 == 0) and (low0 > 0).any() and (low1 > 0).any()
    assert np.corrcoef(h0.ravel(), h1.ravel())[0, 1] < -0.1
    # Per-image class indices pick per-image maps.
    mixed = gradcam.grad_cam(model, variables, x, np.array([0, 1, 0]))
    np.testing.assert_allclose(mixed, np.stack([h0[0], h1[1], h0[2]]), atol=1e-5)


def test_equals_cam_for_global_average_pooling(tiny):
    """With global average pooling and a dense head, d logit_c / d A_k = W[k, c] / (h w), so
    Grad-CAM is CAM (Zhou et al. 2016): ReLU(sum_k W[k, c] A_k) / (h w). The feature map A and
    W come from `capture_intermediates`, independently of the vjp used by grad_cam."""
    model, variables = tiny
    variables = _signed_head(variables)
    x = _images(2, seed=3)
    layer = model.cam_layer(variables["params"])
    _, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=lambda mdl, _: mdl.name == layer,
        mutable=["intermediates"],
    )
    feats = np.asarray(state["intermediates"][layer]["__call__"][0])  # [2, h, w, K]
    kernel = np.asarray(variables["params"]["head"]["kernel"])  # [K, 2]
    h, w = feats.shape[1:3]
    for c in (0, 1):
        expected = np.maximum(feats @ kernel[:, c], 0.0) / (h * w)
        raw = gradcam.grad_cam(model, variables, x, c, resize=False, normalize=False)
        assert raw.shape == (2, h, w)
        np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-7)
        assert expected.max() > 0  # the comparison is not 0 == 0


def _patch_detector(model, variables):
    """Variables for which logit 1 = mean over the last feature map of the image's brightness
    (channel sum, ReLU) and logit 0 = 0: the class-1 evidence is wherever the image is bright."""
    params = jax.tree.map(jnp.zeros_like, variables["params"])
    stem = np.zeros(params["stem_conv"]["kernel"].shape, np.float32)  # [7, 7, 3, width]
    stem[3, 3, :, 0] = 1.0  # centre tap: channel 0 = sum of RGB at each (strided) pixel
    params["stem_conv"]["kernel"] = jnp.asarray(stem)
    # BatchNorm at init (running mean 0, var 1, scale 1, bias 0) is the identity in eval mode;
    # the last BN of each block has scale 0, so every block reduces to its shortcut.
    for name in ("stem_bn", "stage1_block1", "stage2_block1"):
        params[name] = variables["params"][name]
    proj = np.zeros(params["stage2_block1"]["proj_conv"]["kernel"].shape, np.float32)
    proj[0, 0, 0, 0] = 1.0
    params["stage2_block1"]["proj_conv"]["kernel"] = jnp.asarray(proj)
    head = np.zeros(params["head"]["kernel"].shape, np.float32)
    head[0, 1] = 1.0
    params["head"]["kernel"] = jnp.asarray(head)
    return {"params": params, "batch_stats": variables["batch_stats"]}


def test_localises_the_only_evidence(tiny):
    """Images dark but for one bright, non-square patch, and a model whose malignant logit
    depends on that patch only: the map must sit on the patch (a transposed, flipped or shifted
    map fails) and be zero away from it."""
    model, variables = tiny
    detector = _patch_detector(model, variables)
    shifts = np.arange(8)  # one feature-map cell (8 px), pixel by pixel, along the diagonal
    x = np.zeros((8, SIZE, SIZE, 3), np.float32)
    inside = np.zeros((8, SIZE, SIZE), bool)
    for i in shifts:
        inside[i, 8 + i : 24 + i, 40 + i : 60 + i] = True  # 16 x 20 px, top right
    x[inside] = 1.0
    logits = np.asarray(model.apply(detector, x, train=False))
    assert np.all(logits[:, 1] > 0) and np.all(logits[:, 0] == 0)
    np.testing.assert_allclose(  # the hand-built model does what it says: a dark image scores 0
        np.asarray(model.apply(detector, np.zeros_like(x[:1]), train=False)), 0.0
    )

    heat = gradcam.grad_cam(model, detector, x, 1)
    # Farther than 10 px from the patch: one feature cell (8 px, the interpolation's reach) plus
    # the stem max-pool's reach (2 px) can carry evidence no farther.
    far = np.ones_like(inside)
    for i in shifts:
        far[i, max(0, i - 2) : 34 + i, 30 + i : 70 + i] = False
    assert np.all(heat[far] == 0.0)
    for i in shifts:
        assert heat[i][inside[i]].mean() > 0.7
        # The hottest pixels lie on the patch, give or take the max-pool's 2 px reach.
        hot_rows, hot_cols = np.nonzero(heat[i] >= 0.99)
        assert hot_rows.size and hot_rows.min() >= 6 + i and hot_rows.max() < 26 + i
        assert hot_cols.min() >= 38 + i and hot_cols.max() < 62 + i
    # Centroids: each within the 8 px quantisation of the feature map of the patch centre, and
    # unbiased over the 8 sub-cell shifts (plain half-pixel resizing is off by 3.5 px here).
    rows, cols = np.mgrid[:SIZE, :SIZE]
    mass = heat.sum(axis=(1, 2))
    centroid = np.stack([(heat * rows).sum((1, 2)) / mass, (heat * cols).sum((1, 2)) / mass], 1)
    error = centroid - np.stack([15.5 + shifts, 49.5 + shifts], 1)
    assert np.abs(error).max() <= 4.0
    assert np.abs(error.mean(axis=0)).max() < 1.0
    # Class 0's logit does not depend on the image: no evidence anywhere, all-zero maps.
    assert np.all(gradcam.grad_cam(model, detector, x[:2], 0) == 0.0)


def test_most_confident_mistakes():
    probs = np.array(
        [
            [0.9, 0.1],  # right
            [0.2, 0.8],  # wrong, 0.8
            [0.05, 0.95],  # wrong, 0.95
            [0.6, 0.4],  # wrong (label 1), 0.6
            [0.5, 0.5],  # tie: wrong, as in metrics (ties count wrong), 0.5
            [0.3, 0.7],  # right
        ]
    )
    labels = np.array([0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(gradcam.most_confident_mistakes(probs, labels, 10), [2, 1, 3, 4])
    np.testing.assert_array_equal(gradcam.most_confident_mistakes(probs, labels, 2), [2, 1])
    three = np.array([[0.1, 0.3, 0.6], [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    np.testing.assert_array_equal(
        gradcam.most_confident_mistakes(three, np.array([0, 0, 2]), 5), [0, 2]
    )
    assert gradcam.most_confident_mistakes(probs[:0], labels[:0], 3).size == 0


def test_denormalize_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = (img / 255.0 - image_ops.IMAGENET_MEAN) / image_ops.IMAGENET_STD
    np.testing.assert_array_equal(gradcam.denormalize(x), img)


def test_mistakes_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    k, size = 5, 48
    images = np.full((k, size, size, 3), 200, np.uint8)
    images[:, 16:32, 16:32] = (120, 60, 40)  # a brown "lesion"
    heat = np.zeros((k, size, size), np.float32)
    heat[:, 10:38, 10:38] = rng.random((k, 28, 28))
    path = tmp_path / "mistakes.png"
    gradcam.mistakes_grid(
        path,
        images,
        heat,
        [f"ISIC_{i}\ntrue benign, pred malignant 0.9" for i in range(k)],
        ncols=3,
        suptitle="mistakes",
    )
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 600 and im.height >= 300
        pix = np.asarray(im.convert("RGB"), np.float32)
    assert pix.std() > 20
    # The jet overlay adds colours the plain images do not have (blues of the heat map).
    blueish = (pix[..., 2] > pix[..., 0] + 30) & (pix[..., 2] > pix[..., 1] + 20)
    assert blueish.mean() > 0.1
    with pytest.raises(ValueError):
        gradcam.mistakes_grid(tmp_path / "bad.png", images, heat[:3], ["x"] * k)


def test_write_mistakes_figure(tiny, tmp_path):
    model, variables = tiny
    variables = _signed_head(variables)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 1, 0])
    path = tmp_path / "mistakes.png"
    seen = []

    def preprocess(batch):
        seen.append((batch.shape, batch.dtype))
        return image_ops.normalize(batch)

    rows = gradcam.write_mistakes_figure(
        path,
        model,
        variables,
        images,
        probs=probs,
        labels=labels,
        class_names=["benign", "malignant"],
        image_ids=[b"a", "b", np.bytes_(b"c")],
        preprocess=preprocess,
        batch_size=2,
    )
    # Two batches of 2 (the last one padded: one compiled shape), uint8 into the preprocess.
    assert seen == [((2, SIZE, SIZE, 3), np.uint8)] * 2
    assert rows == [
        {"image_id": "a", "label": "benign", "predicted": "malignant", "probability": 0.9},
        {"image_id": "b", "label": "malignant", "predicted": "benign", "probability": 0.8},
        {"image_id": "c", "label": "benign", "predicted": "malignant", "probability": 0.7},
    ]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600


def test_upsample_places_cells_on_their_pixels_and_holds_the_edges():
    """Cell m of a stride-8 map lands on pixel 8 m; past the last centre its value is held (no
    cold strip along the right and bottom edges, which jax.image.scale_and_translate drew)."""
    cam = np.random.default_rng(0).random((2, 9, 9)).astype(np.float32)
    up = np.asarray(gradcam._upsample(jnp.asarray(cam), (72, 72)))
    assert up.shape == (2, 72, 72)
    np.testing.assert_allclose(up[:, ::8, ::8], cam, atol=1e-6)
    np.testing.assert_allclose(up[:, 64:, 71], np.repeat(cam[:, 8:, 8], 8, axis=1), atol=1e-6)
    np.testing.assert_allclose(up[:, 71, :64:8], cam[:, 8, :8], atol=1e-6)
    assert up.min() >= cam.min() - 1e-6 and up.max() <= cam.max() + 1e-6
