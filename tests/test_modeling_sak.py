"""SAKForMultiTask: DESIGN section 2 rule by rule, the Hub round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import TEACHERS, TINY_IMAGE_SIZE, nyud_labels, tiny_config
from safetensors import safe_open
from transformers import (
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

from modeling_sak import SAKForMultiTask
from modeling_sak.remote_code.modeling_sak import resize_position_embeddings


def make_model(**overrides) -> SAKForMultiTask:
    return SAKForMultiTask(tiny_config(**overrides)).eval()


def image(batch=2, size=TINY_IMAGE_SIZE, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_outputs_have_the_input_size_for_any_size():
    model = make_model()
    for size in [TINY_IMAGE_SIZE, (80, 80), (70, 90), (17, 33)]:
        out = model(image(2, size))
        assert {task: tuple(t.shape) for task, t in out.task_outputs.items()} == {
            "semseg": (2, 40, *size),
            "normals": (2, 3, *size),
            "edge": (2, 1, *size),
            "depth": (2, 1, *size),
        }
        assert out.router_weights["semseg"].shape == (2, 4, 1 + len(TEACHERS))
        torch.testing.assert_close(out.router_weights["depth"].sum(-1), torch.ones(2, 4))


def test_padding_to_the_patch_size_equals_padding_by_hand():
    model = make_model()
    x = image(1, (60, 90))
    padded = F.pad(x, (0, 6, 0, 4))
    with torch.no_grad():
        cropped = {k: v[..., :60, :90] for k, v in model(padded).task_outputs.items()}
        direct = model(x).task_outputs
    for task in direct:
        torch.testing.assert_close(direct[task], cropped[task], rtol=0, atol=0)


def test_position_embedding_is_interpolated_only_off_the_training_grid():
    positions = torch.randn(1, 1 + 4 * 6, 8)
    assert resize_position_embeddings(positions, (4, 6), (4, 6)) is positions
    resized = resize_position_embeddings(positions, (4, 6), (8, 12))
    assert resized.shape == (1, 1 + 8 * 12, 8)
    torch.testing.assert_close(resized[:, :1], positions[:, :1])  # class position kept
    with pytest.raises(ValueError, match="not a 5x6 grid"):
        resize_position_embeddings(positions, (5, 6), (4, 6))


def test_adapter_chain_follows_the_stem_blocks():
    """r^0 = A^0(x_0); r^i = A^i(r^{i-1} + x_i); f^l = LN_l(r^{out_l} without the class token)."""
    model = make_model(out_indices=[0, 2])
    x = image(1)
    with torch.no_grad():
        hidden = model.stem(x)
        path = model.teacher_paths["clip"]
        r = path.adapters[0](hidden[0])
        expected = []
        for i in range(4):
            r = path.adapters[i + 1](r + hidden[i + 1])
            if i in (0, 2):
                expected.append(path.output_norms[len(expected)](r[:, 1:]))
        got = path(hidden)
    assert len(got) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    # Each adapter is z + s * up(gelu(down(z))).
    adapter, z = path.adapters[1], torch.randn(2, 5, 32)
    with torch.no_grad():
        adapter.scale.fill_(0.5)
        torch.testing.assert_close(adapter(z), z + 0.5 * adapter.up(F.gelu(adapter.down(z))))


@pytest.mark.parametrize("expert", range(1 + len(TEACHERS)))
def test_router_expert_order_is_stem_then_teachers_in_config_order(expert):
    model = make_model(noisy_gating=False)
    x = image(1)
    with torch.no_grad():
        for router in model.routers["normals"]:
            router.gate[3].weight.zero_()
            router.gate[3].bias.fill_(-30.0)
            router.gate[3].bias[expert] = 30.0
        out = model(x, output_hidden_states=True)
        hidden = out.hidden_states
        stem_level = hidden[model.config.out_indices[1] + 1][:, 1:]
        features = [stem_level] + [model.teacher_paths[t](hidden)[1] for t in TEACHERS]
        mixed, weights = model.routers["normals"][1](stem_level, features[1:])
    torch.testing.assert_close(weights, F.one_hot(torch.tensor([expert]), 4).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed, features[expert], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.router_weights["normals"][:, 1], weights)


def test_router_mixes_with_per_image_softmax_of_token_mean_logits():
    model = make_model(noisy_gating=False)
    router = model.routers["semseg"][0]
    tokens, experts = torch.randn(2, 24, 32), [torch.randn(2, 24, 32) for _ in TEACHERS]
    with torch.no_grad():
        mixed, weights = router(tokens, experts)
        logits = router.gate(tokens).mean(dim=1)
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights, probs)
    expected = sum(p[:, None, None] * f for p, f in zip(probs.unbind(-1), [tokens, *experts]))
    torch.testing.assert_close(mixed, expected)


def test_noisy_gating_adds_noise_in_training_only():
    model = make_model(noisy_gating=True)
    router = model.routers["edge"][2]
    tokens, experts = torch.randn(2, 24, 32), [torch.randn(2, 24, 32) for _ in TEACHERS]
    assert router.gate[3].out_features == 2 * 4
    router.eval()
    with torch.no_grad():
        first, second = router(tokens, experts)[1], router(tokens, experts)[1]
        clean = router.gate(tokens).mean(1)[:, :4].softmax(-1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, clean)
    router.train()
    with torch.no_grad():
        torch.manual_seed(1)
        noisy_a = router(tokens, experts)[1]
        noisy_b = router(tokens, experts)[1]
        # The same draw of eps reproduces clean + eps * (softplus(raw) + 0.01).
        torch.manual_seed(1)
        logits = router.gate(tokens).mean(1)
        eps = torch.randn(2, 4)
        expected = (logits[:, :4] + eps * (F.softplus(logits[:, 4:]) + 0.01)).softmax(-1)
    assert not torch.allclose(noisy_a, noisy_b)
    torch.testing.assert_close(noisy_a, expected)


def test_router_none_sums_stem_and_teacher_features():
    model = make_model(router_type="none")
    assert model.routers is None
    x = image(1)
    with torch.no_grad():
        hidden = model.stem(x)
        paths = {t: model.teacher_paths[t](hidden) for t in TEACHERS}
        levels = [hidden[b + 1][:, 1:] for b in model.config.out_indices]
        features, weights = model._mix_representations(levels, paths)
        out = model(x)
    assert weights is None and out.router_weights is None
    torch.testing.assert_close(features["depth"][3], levels[3] + sum(paths[t][3] for t in TEACHERS))


def test_no_teacher_baseline_feeds_the_stem_to_the_heads():
    model = make_model(teachers={})
    assert len(model.teacher_paths) == 0 and model.routers is None
    out = model(image(1), labels=nyud_labels(1, *TINY_IMAGE_SIZE))
    assert out.loss is not None and out.router_weights is None and out.distill_losses is None


def test_task_head_structure_and_resizing():
    model = make_model()
    head = model.heads["semseg"]
    assert head.fuse_conv.kernel_size == (3, 3) and head.fuse_conv.bias is not None
    levels = [torch.randn(1, 24, 32) for _ in range(4)]
    with torch.no_grad():
        out = head(levels, (4, 6), (64, 96))
        maps = [
            F.interpolate(p(f).transpose(1, 2).reshape(1, 8, 4, 6), size=(16, 24), mode="bilinear")
            for p, f in zip(head.level_projections, levels)
        ]
        x = F.gelu(head.fuse_norm(head.fuse_conv(torch.cat(maps, 1))))
        expected = F.interpolate(head.classifier(x), size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_loss_is_weighted_tasks_plus_alpha_times_distillation():
    model = make_model(use_aligners=True, teachers={"dinov2": 48, "clip": 32, "sam": 40}, distill_alpha=0.5)
    x = image(2)
    labels = nyud_labels(2, *TINY_IMAGE_SIZE)
    teachers = {
        "dinov2": [torch.randn(2, 48, 5, 7)] * 4,
        "clip": [torch.randn(2, 32, 4, 6)] * 4,
        "sam": [torch.randn(2, 40, 8, 8)] * 4,
    }
    out = model(x, labels=labels, teacher_features=teachers)
    weights = model.config.task_loss_weights
    assert set(out.task_losses) == {"semseg", "normals", "edge", "depth"}
    assert set(out.distill_losses) == {f"{t}_level{k}" for t in TEACHERS for k in range(1, 5)}
    expected = sum(weights[t] * v for t, v in out.task_losses.items()) + 0.5 * sum(out.distill_losses.values())
    torch.testing.assert_close(out.loss, expected)
    assert out.student_features["dinov2"][0].shape == (2, 48, 4, 6)  # aligned to the teacher width, student grid
    # Only the distillation term: loss = alpha * total.
    only = model(x, teacher_features=teachers)
    torch.testing.assert_close(only.loss, 0.5 * sum(only.distill_losses.values()))


def test_labels_set_to_none_skip_a_task():
    model = make_model()
    labels = nyud_labels(1, *TINY_IMAGE_SIZE) | {"edge": None}
    out = model(image(1), labels=labels)
    assert set(out.task_losses) == {"semseg", "normals", "depth"}


def test_training_step_changes_weights_and_gradients_reach_every_module():
    model = make_model(use_aligners=True, teachers={"dinov2": 48, "clip": 32, "sam": 32}).train()
    teachers = {
        name: [torch.randn(2, spec["hidden_size"], 4, 6) for _ in range(4)]
        for name, spec in model.config.teachers.items()
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(image(2), labels=nyud_labels(2, *TINY_IMAGE_SIZE), teacher_features=teachers)
    out.loss.backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.grad is None and not (n.startswith("teacher_paths.") and ".adapters.4." in n)
    ]
    assert no_grad == []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    reference = make_model(noisy_gating=False).train()
    checkpointed = make_model(noisy_gating=False).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.stem.layers)
    x, labels = image(2), nyud_labels(2, *TINY_IMAGE_SIZE)
    reference(x, labels=labels).loss.backward()
    checkpointed(x, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_attention_implementations_agree_with_sdpa(implementation):
    """The stem attends through transformers' attention interface; every implementation gives SDPA's outputs."""
    sdpa = SAKForMultiTask(tiny_config()).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    other = AutoModel.from_config(tiny_config(), attn_implementation=implementation).eval()
    assert other.config._attn_implementation == implementation
    other.load_state_dict(sdpa.state_dict())
    x = image(2)
    with torch.no_grad():
        a, b = sdpa(x, output_hidden_states=True), other(x, output_hidden_states=True)
    for task in a.task_outputs:
        torch.testing.assert_close(a.task_outputs[task], b.task_outputs[task], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden_states[-1], b.hidden_states[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_close_to_float32(dtype):
    model = make_model()
    x = image(2)
    with torch.no_grad():
        reference = model(x).task_outputs
        with torch.autocast("cpu", dtype=dtype):
            low = model(x, labels=nyud_labels(2, *TINY_IMAGE_SIZE))
    assert torch.isfinite(low.loss)
    for task, value in reference.items():
        error = (low.task_outputs[task].float() - value).norm() / value.norm()
        assert error < 3e-2, (task, error)


def test_training_step_save_and_reload_in_a_fresh_process_through_remote_code(tmp_path):
    """The issue's acceptance test: build, step, save, reload via AutoModel(trust_remote_code) without the package."""
    model = make_model(use_aligners=True, teachers={"dinov2": 48, "clip": 32, "sam": 32}).train()
    teachers = {
        name: [torch.randn(2, spec["hidden_size"], 4, 6) for _ in range(4)]
        for name, spec in model.config.teachers.items()
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(image(2), labels=nyud_labels(2, *TINY_IMAGE_SIZE), teacher_features=teachers).loss.backward()
    optimizer.step()
    model.eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    x = image(2, (70, 90))
    with torch.no_grad():
        expected = model(x).task_outputs
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")

    with safe_open(checkpoint / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert not [k for k in keys if k.startswith("aligners.") or "teacher." in k]
    assert any(k.startswith("teacher_paths.") for k in keys)
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_sak.SAKForMultiTask"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "configuration_sak.py",
        "modeling_sak.py",
        "losses.py",
        "fast_path_sak.py",
    }

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["modeling_sak"] = None  # make the package unimportable: the class must come from the checkpoint
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            out = model(io["x"]).task_outputs
        for task, value in io["expected"].items():
            torch.testing.assert_close(out[task], value, atol=1e-6, rtol=0)
        print("OK", sorted(out))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ['depth', 'edge', 'normals', 'semseg']" in result.stdout

    # The same checkpoint also loads in-process through the registered classes.
    reloaded = AutoModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).task_outputs["depth"], expected["depth"], atol=1e-6, rtol=0)


def test_aligners_can_be_kept_for_training_checkpoints(tmp_path):
    model = make_model(use_aligners=True, teachers={"dinov2": 48, "clip": 32, "sam": 32})
    model.save_pretrained(tmp_path, include_aligners=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert "aligners.dinov2.0.weight" in handle.keys()
    reloaded = SAKForMultiTask.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.aligners["dinov2"][0].weight, model.aligners["dinov2"][0].weight)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.randn(3, 64, 96)), "4D tensor"),
        (lambda m: m(torch.randn(1, 1, 64, 96)), "1 channels but the stem expects 3"),
        (lambda m: m(torch.randn(1, 3, 64, 96), labels={"semseg": torch.zeros(1, 64, 96)}), "lack the tasks"),
        (lambda m: m(torch.randn(1, 3, 64, 96), labels={"segm": torch.zeros(1, 64, 96)}), "unknown tasks"),
        (
            lambda m: m(torch.randn(1, 3, 64, 96), labels=nyud_labels(1, 32, 48)),
            r"spatial size \(32, 48\) but the prediction is \(64, 96\)",
        ),
        (
            lambda m: m(torch.randn(1, 3, 64, 96), teacher_features={"dinov2": [torch.randn(1, 32, 4, 6)] * 4}),
            "give one entry per teacher",
        ),
        (
            lambda m: m(
                torch.randn(1, 3, 64, 96), teacher_features={t: [torch.randn(1, 32, 4, 6)] * 3 for t in TEACHERS}
            ),
            "must hold 4 maps",
        ),
        (
            lambda m: m(
                torch.randn(1, 3, 64, 96), teacher_features={t: [torch.randn(1, 16, 4, 6)] * 4 for t in TEACHERS}
            ),
            r"must be \(batch_size=1, 32, h, w\)",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_model())


def _hf_stem(kind: str, path):
    if kind == "vit":
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[64, 96],
            patch_size=16,
            layer_norm_eps=1e-6,
        )
        model = ViTModel(config, add_pooling_layer=False)
    elif kind == "dinov2":
        config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=56, patch_size=14)
        model = Dinov2Model(config)
    else:
        config = Dinov2WithRegistersConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            num_register_tokens=2,
        )
        model = Dinov2WithRegistersModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.5, 1.5)  # layer scale must be carried over, not re-initialised
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_with_registers"])
def test_new_sak_from_a_transformers_stem_reproduces_its_hidden_states(kind, tmp_path):
    hf_model = _hf_stem(kind, tmp_path)
    size = [64, 96] if kind == "vit" else [56, 56]
    sak = SAKForMultiTask.from_stem_pretrained(str(tmp_path), teachers={"dinov2": 32}, image_size=size).eval()
    assert sak.config.stem_config.model_type == kind
    x = image(2, tuple(size))
    with torch.no_grad():
        expected = hf_model(x, output_hidden_states=True).hidden_states
        got = sak(x, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_stem_position_embedding_is_resampled_to_the_sak_image_size(tmp_path):
    _hf_stem("vit", tmp_path)
    sak = SAKForMultiTask.from_stem_pretrained(str(tmp_path), teachers={"sam": 32}, image_size=[128, 128])
    assert sak.stem.embeddings.position_embeddings.shape == (1, 1 + 8 * 8, 32)
    assert sak(image(1, (128, 128))).task_outputs["semseg"].shape == (1, 40, 128, 128)
