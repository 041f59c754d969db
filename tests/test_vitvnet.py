"""ViT-V-Net: exact published architecture, small forward/backward, official key loading."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitreg.errors import VitregError
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig, load_state_dict
from vitreg.transform import integrate_velocity, warp

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official-state-dict.tsv"
AUTHORS_OUTPUT_SCRIPT = Path(__file__).parent / "data" / "make_authors_output.py"

SMALL = VitVNetConfig(
    img_size=(32, 32, 64),
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    mlp_dim=48,
    conv_first_channel=32,
)


def official_entries() -> dict[str, tuple[int, ...]]:
    """Key -> shape from the official state dict listing (authors' code at 160x192x224)."""
    entries = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        entries[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return entries


def test_published_model_has_exact_parameter_count_and_official_keys():
    model = VitVNet()
    assert sum(p.numel() for p in model.parameters()) == 31_560_079
    assert all(p.requires_grad for p in model.parameters())
    official = official_entries()
    assert len(official) == 278
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official.pop("spatial_trans.grid")
    assert ours == official
    # Same order as the authors' state dict too.
    assert list(ours) == list(official)


def authors_reference():
    """The generator module (its weight and input rule) and the arrays it stored."""
    spec = importlib.util.spec_from_file_location("make_authors_output", AUTHORS_OUTPUT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with np.load(module.OUTPUT) as stored:
        return module, {key: stored[key] for key in stored.files}


def test_flow_and_warp_equal_the_authors_code_for_the_same_weights_and_input():
    rule, stored = authors_reference()
    model = VitVNet(VitVNetConfig(img_size=rule.IMG_SIZE, **rule.SMALL)).eval()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes = json.loads(str(stored["state_dict_shapes"]))
    theirs = dict(zip(stored["state_dict_keys"].tolist(), shapes, strict=True))
    assert ours == theirs
    # The same numbers go in as went into their network (else the rule's stream changed).
    assert rule.fill_model(model) == pytest.approx(float(stored["weights_abs_sum"]), rel=1e-12)
    inputs = rule.reference_input()
    assert inputs.astype(np.float64).sum() == pytest.approx(float(stored["input_sum"]), rel=1e-12)
    moving_fixed = torch.from_numpy(inputs)
    with torch.no_grad():
        flow = model(moving_fixed)
        warped = warp(moving_fixed[:, :1], flow)
    expected_flow = stored["flow_sub2"]
    assert expected_flow.std() > 0.5  # voxels: a flow that moves the image, not the init's ~0
    np.testing.assert_allclose(rule.subsample(flow.numpy()), expected_flow, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        rule.subsample(warped.numpy()), stored["warped_sub2"], rtol=0, atol=1e-5
    )
    streamed = model.infer(moving_fixed, rows_per_chunk=5)
    np.testing.assert_allclose(rule.subsample(streamed.numpy()), expected_flow, rtol=0, atol=1e-4)


def test_initial_flow_is_near_identity_and_warps_moving():
    torch.manual_seed(0)
    model = VitVNet(SMALL).eval()
    moving, fixed = torch.rand(1, 1, *SMALL.img_size), torch.rand(1, 1, *SMALL.img_size)
    with torch.no_grad():
        warped, flow = model.register(moving, fixed)
    assert flow.shape == (1, 3, *SMALL.img_size)
    assert 0 < flow.abs().max() < 1e-3
    torch.testing.assert_close(warped, moving, atol=1e-3, rtol=0)


def test_forward_backward_on_reduced_config_moves_the_head():
    torch.manual_seed(0)
    model = VitVNet(SMALL).train()
    moving_fixed = torch.rand(2, 2, *SMALL.img_size)
    flow = model(moving_fixed)
    loss = (warp(moving_fixed[:, :1], flow) - moving_fixed[:, 1:]).pow(2).mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["reg_head.0.weight"].abs().sum() > 0
    assert grads["transformer.embeddings.position_embeddings"].abs().sum() > 0


def test_full_width_model_runs_at_64_cubed():
    torch.manual_seed(0)
    model = VitVNet(VitVNetConfig(img_size=(64, 64, 64))).eval()
    with torch.inference_mode():
        flow = model(torch.rand(1, 2, 64, 64, 64))
    assert flow.shape == (1, 3, 64, 64, 64)
    assert torch.isfinite(flow).all()


def test_state_dict_saves_and_reloads_under_official_names(tmp_path):
    torch.manual_seed(0)
    model = VitVNet(SMALL).eval()
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    restored = VitVNet(SMALL).eval()
    load_state_dict(restored, load_file(str(path)))
    inputs = torch.rand(1, 2, *SMALL.img_size)
    with torch.no_grad():
        torch.testing.assert_close(restored(inputs), model(inputs))
    assert "decoder.blocks.4.conv2.1.running_var" in load_file(str(path))


def test_authors_grid_buffer_is_ignored_and_bad_keys_are_named():
    model = VitVNet(SMALL)
    state = dict(model.state_dict())
    state["spatial_trans.grid"] = torch.zeros(1, 3, *SMALL.img_size)
    load_state_dict(VitVNet(SMALL), state)

    missing = {k: v for k, v in state.items() if k != "reg_head.0.bias"}
    with pytest.raises(VitregError, match="reg_head.0.bias"):
        load_state_dict(VitVNet(SMALL), missing)
    misshaped = dict(state, **{"reg_head.0.weight": torch.zeros(3, 16, 3, 3, 1)})
    with pytest.raises(VitregError, match=r"reg_head\.0\.weight.*\(3, 16, 3, 3, 1\)"):
        load_state_dict(VitVNet(SMALL), misshaped)


def test_position_embeddings_from_another_size_are_resized_with_a_warning():
    trained = VitVNet(SMALL)
    with torch.no_grad():
        trained.transformer.embeddings.position_embeddings.normal_()
    bigger = VitVNetConfig(**{**SMALL.__dict__, "img_size": (64, 64, 64)})
    model = VitVNet(bigger)
    with pytest.warns(UserWarning, match="resizing"):
        load_state_dict(model, trained.state_dict(), trained_img_size=SMALL.img_size)
    embeddings = model.transformer.embeddings.position_embeddings
    assert embeddings.shape == (1, 8, SMALL.hidden_size)
    # Tokens (0,0,0) and (0,0,1) of the 1x1x2 grid map onto the two halves of the 2x2x2 grid.
    old = trained.transformer.embeddings.position_embeddings[0]
    torch.testing.assert_close(embeddings[0, 0], old[0])
    torch.testing.assert_close(embeddings[0, 7], old[1])


def test_size_not_divisible_by_32_names_the_nearest_valid_size():
    with pytest.raises(
        VitregError, match=r"\(160, 190, 224\).*nearest valid size is \(160, 192, 224\)"
    ):
        VitVNetConfig(img_size=(160, 190, 224))


def test_wrong_input_channels_or_size_say_what_was_expected():
    model = VitVNet(SMALL)
    with pytest.raises(VitregError, match=r"\(B, 2, D, H, W\)"):
        model(torch.zeros(1, 3, *SMALL.img_size))
    with pytest.raises(VitregError, match="built for size"):
        model(torch.zeros(1, 2, 64, 64, 64))


def test_config_round_trips_through_a_dict():
    assert VitVNetConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(VitregError, match="unknown"):
        VitVNetConfig.from_dict({"bogus": 1})


def test_int_steps_integrate_the_head_output_as_a_velocity():
    torch.manual_seed(0)
    plain = VitVNet(replace(SMALL, flow_init_std=5.0)).eval()
    diffeomorphic = VitVNet(replace(SMALL, flow_init_std=5.0, int_steps=4)).eval()
    diffeomorphic.load_state_dict(plain.state_dict())
    moving_fixed = torch.rand(1, 2, *SMALL.img_size)
    with torch.no_grad():
        velocity = plain(moving_fixed)
        assert velocity.abs().max() > 1  # voxels: integration is not a no-op
        torch.testing.assert_close(diffeomorphic(moving_fixed), integrate_velocity(velocity, 4))


def _spread_head(model: VitVNet) -> VitVNet:
    """Re-draw the registration head so the flow spreads over ~1 voxel (a meaningful scale for
    tolerances in voxels) and give the batch norms non-trivial statistics."""
    with torch.no_grad():
        model.reg_head[0].weight.normal_(std=0.2)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("rows_per_chunk", [1, 6, 100])
def test_streamed_inference_equals_forward_bit_for_bit(rows_per_chunk):
    # Batch 2 makes PyTorch's plain forward use oneDNN for every convolution, as it does at
    # the published size; the streamed path then reproduces it exactly (max |diff| = 0).
    torch.manual_seed(0)
    config = VitVNetConfig(**{**SMALL.__dict__, "img_size": (32, 32, 32)})
    model = _spread_head(VitVNet(config).eval())
    moving_fixed = torch.rand(2, 2, *config.img_size)
    with torch.inference_mode():
        expected = model(moving_fixed)
    flow = model.infer(moving_fixed, rows_per_chunk=rows_per_chunk, channels_last=False)
    assert expected.std() > 0.1
    assert torch.equal(flow, expected)


def test_channels_last_inference_matches_forward_within_1e_5_voxel():
    torch.manual_seed(0)
    model = _spread_head(VitVNet(SMALL).eval())
    moving_fixed = torch.rand(1, 2, *SMALL.img_size)
    with torch.inference_mode():
        expected = model(moving_fixed)
    flow = model.infer(moving_fixed, rows_per_chunk=7)
    assert flow.is_contiguous() and flow.shape == expected.shape
    assert (flow - expected).abs().max() < 1e-5  # measured: ~1e-7 on a flow of std ~0.3 voxel


def test_inference_needs_eval_mode_and_checks_its_input():
    model = VitVNet(SMALL)
    with pytest.raises(RuntimeError, match="eval"):
        model.infer(torch.zeros(1, 2, *SMALL.img_size))
    with pytest.raises(VitregError, match="built for size"):
        model.eval().infer(torch.zeros(1, 2, 64, 64, 64))


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    torch.manual_seed(0)
    config = VitVNetConfig(**{**SMALL.__dict__, "img_size": (32, 32, 32)})
    moving_fixed = torch.rand(1, 2, *config.img_size)
    gradients, kept = [], []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = _spread_head(VitVNet(config)).eval().checkpoint_activations(checkpointing)
        saved = []

        def keep(tensor: torch.Tensor, saved: list = saved) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(moving_fixed).square().mean()
        loss.backward()
        kept.append(sum(saved))
        gradients.append({n: p.grad for n, p in model.named_parameters()})
    assert kept[1] < kept[0] / 3  # values held for the backward pass outside the recomputation
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inference_fp32_and_bf16_match_the_cpu_forward():
    torch.manual_seed(0)
    model = _spread_head(VitVNet(SMALL).eval())
    moving_fixed = torch.rand(1, 2, *SMALL.img_size)
    with torch.inference_mode():
        expected = model(moving_fixed)
    model = model.cuda()
    on_gpu = moving_fixed.cuda()
    flow = model.infer(on_gpu, rows_per_chunk=SMALL.img_size[0]).cpu()
    assert (flow - expected).abs().max() < 1e-3  # TF32 may be on for convolutions
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flow_bf16 = model.infer(on_gpu, rows_per_chunk=SMALL.img_size[0]).float().cpu()
    assert (flow_bf16 - expected).abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_with_checkpointing_and_bf16_matches_fp32_gradients():
    torch.manual_seed(0)
    config = VitVNetConfig(**{**SMALL.__dict__, "dropout_rate": 0.0})
    model = VitVNet(config).cuda().train()
    moving_fixed = torch.rand(2, 2, *SMALL.img_size, device="cuda")
    model(moving_fixed).square().mean().backward()
    expected = model.reg_head[0].weight.grad.clone()
    model.zero_grad()
    model.checkpoint_activations(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(moving_fixed).float().square().mean()
    loss.backward()
    gradient = model.reg_head[0].weight.grad
    assert torch.cosine_similarity(gradient.flatten(), expected.flatten(), dim=0) > 0.99


def test_inference_integrates_a_diffeomorphic_config_like_forward():
    torch.manual_seed(0)
    model = _spread_head(VitVNet(replace(SMALL, int_steps=4)).eval())
    moving_fixed = torch.rand(1, 2, *SMALL.img_size)
    with torch.inference_mode():
        expected = model(moving_fixed)
    flow = model.infer(moving_fixed, rows_per_chunk=5)
    assert not flow.is_inference()
    assert (flow - expected).abs().max() < 1e-4
