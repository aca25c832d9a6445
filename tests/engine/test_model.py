import pytest
import torch

from napari_sparse3d.config import ModelConfig
from napari_sparse3d.engine.model import InstanceNorm3d, UNet3D, plan_levels


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"downsample": "conv", "upsample": "trilinear"},
        {"norm": "batch", "activation": "relu"},
        {"norm": "none"},
    ],
)
@pytest.mark.parametrize("shape", [(4, 12, 20), (8, 8, 8), (12, 4, 28)])
def test_tiny_models_keep_odd_shapes(options, shape):
    model = UNet3D(2, 3, ModelConfig(levels=3, base_features=2, **options)).eval()
    x = torch.randn(1, 2 + model.prior_channels, *shape)
    assert model(x).shape == (1, 3, *shape)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_instance_norm_by_group_norm_is_torchs_instance_norm(layout):
    torch.manual_seed(0)
    ours, theirs = InstanceNorm3d(6, affine=True), torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())  # the same parameters: checkpoints are interchangeable
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = (3 * torch.randn(2, 6, 5, 7, 9) + 1).to(memory_format=layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad), yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)
    if layout is torch.channels_last_3d:  # no copy to the contiguous layout
        assert ya.is_contiguous(memory_format=torch.channels_last_3d)


def test_bfloat16_channels_last_norm_is_the_same_norm_forward_and_backward():
    """bfloat16 channels-last takes a round trip through the contiguous layout (faster on the CPU):
    the same values and gradients as the float32 norm, to bfloat16's rounding, and the same layout."""
    torch.manual_seed(0)
    norm = InstanceNorm3d(8, affine=True)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = (3 * torch.randn(2, 8, 6, 10, 12) + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    reference_in = x.float().requires_grad_()
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()  # norm.to() below changes its own
    reference = torch.nn.functional.group_norm(reference_in, 8, weight, bias, norm.eps)
    with torch.no_grad():
        y = norm.to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.02)  # bfloat16's rounding
    trained_in = x.clone().requires_grad_()
    trained = norm(trained_in)
    assert trained.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(trained.float(), y.float())
    grad = torch.randn_like(reference)
    trained.backward(grad.to(torch.bfloat16)), reference.backward(grad)
    assert trained_in.grad.is_contiguous(memory_format=torch.channels_last_3d)
    scale = reference_in.grad.abs().max()
    torch.testing.assert_close(trained_in.grad.float() / scale, reference_in.grad / scale, atol=0.03, rtol=0.03)


def test_features_double_per_level_and_are_capped():
    model = UNet3D(1, 2, ModelConfig(levels=5, base_features=8, max_features=32))
    assert model.features == [8, 16, 32, 32, 32]


def test_anisotropic_spacing_keeps_z_until_voxels_are_comparable():
    kernels, strides = plan_levels(4, (4.0, 1.0, 1.0))
    assert strides[0] == (1, 2, 2)  # z is 4x coarser: not pooled
    assert kernels[0] == (1, 3, 3)  # and not convolved across
    assert strides[1] == (1, 2, 2) or strides[1] == (2, 2, 2)
    assert strides[2] == (2, 2, 2)  # after two in-plane poolings the voxels are isotropic
    model = UNet3D(1, 2, ModelConfig(levels=4, base_features=2), spacing=(4.0, 1.0, 1.0)).eval()
    assert model.divisor[0] < model.divisor[1]
    x = torch.randn(1, 1 + model.prior_channels, model.divisor[0] * 3, 16, 24)
    assert model(x).shape == (1, 2, *x.shape[2:])


def test_isotropic_plan():
    kernels, strides = plan_levels(3, None)
    assert kernels == [(3, 3, 3)] * 3 and strides == [(2, 2, 2)] * 2


def test_deep_supervision_returns_finest_first_while_training():
    model = UNet3D(1, 2, ModelConfig(levels=3, base_features=2, deep_supervision=True, pixel_classifier=False))
    outputs = model(torch.randn(1, 1, 8, 16, 16))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 16, 16), (4, 8, 8)]
    model.eval()
    assert model(torch.randn(1, 1, 8, 16, 16)).shape == (1, 2, 8, 16, 16)


def test_with_a_pixel_classifier_the_untrained_network_predicts_its_prior():
    model = UNet3D(1, 3, ModelConfig(levels=3, base_features=2, deep_supervision=True))
    assert model.prior_channels == 3
    assert model.encoder[0][0].in_channels == 4  # image + three class probabilities
    prior = torch.softmax(torch.randn(2, 3, 8, 16, 16), dim=1)  # (probabilities under 1e-4 are clamped)
    x = torch.cat([torch.randn(2, 1, 8, 16, 16), prior], dim=1)
    outputs = model(x)  # training: the finest output carries the prior, the coarser ones do not
    torch.testing.assert_close(torch.softmax(outputs[0], 1), prior, atol=1e-4, rtol=0)
    model.eval()
    torch.testing.assert_close(torch.softmax(model(x), 1), prior, atol=1e-4, rtol=0)
    # the classifier is not trained by the network's optimiser: its weights are buffers
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("pixel_head") for n in names)
    assert {"pixel_head.w1", "pixel_head.mean", "pixel_head.fitted"} <= set(model.state_dict())
