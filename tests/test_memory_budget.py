"""memory_budget.py: each counted part against the bytes a tiny run really holds, the probe against hand-counted
saved tensors, the extrapolation against a direct measurement."""

import copy

import pytest
import torch

import memory_budget as mb


def state_bytes(optimizer):
    """Bytes of the optimiser's state tensors (scalar step counters left out)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.ndim > 0)


def stepped(params, optimizer):
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_optimizer_state_bytes_match_the_optimizers_own_state(kind):
    from transformers.optimization import Adafactor

    shapes = [(16, 8), (4, 3, 3, 3), (5,), (2, 7, 6)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    if kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    else:  # as the trainer makes it (--use_adafactor)
        optimizer = Adafactor(params, lr=1e-3, clip_threshold=1.0, scale_parameter=False, relative_step=False)
    assert mb.optimizer_state_bytes(shapes, kind) == state_bytes(stepped(params, optimizer))


def test_lora_parameter_shapes_are_the_adapters_peft_adds(sdxl_pipe):
    from peft import LoraConfig

    unet = copy.deepcopy(sdxl_pipe.unet)
    expected = mb.lora_parameter_shapes(unet, 4, "to_k,to_q,to_v,to_out.0")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    added = [tuple(p.shape) for name, p in unet.named_parameters() if "lora_" in name]
    assert expected and sorted(expected) == sorted(added)


def test_graph_bytes_counts_each_saved_storage_once_and_not_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6, requires_grad=True)
    # by hand: the first Linear saves its input x (4 x 6), ReLU its output (4 x 5), which the second Linear saves
    # again as its input (the same storage); the weights are parameters; float32
    assert mb.graph_bytes(lambda: model(x), x, exclude=list(model.parameters())) == 4 * (4 * 6 + 4 * 5)
    # no parameter gradient is made
    assert all(p.grad is None for p in model.parameters())


def test_extrapolate_follows_a_line_in_pixel_count():
    line = {8: 100 + 3 * 8**2, 16: 100 + 3 * 16**2}
    assert mb.extrapolate(line, 64) == pytest.approx(100 + 3 * 64**2)
    assert mb.extrapolate({8: 640}, 32) == pytest.approx(640 * 16)  # one probe: through the origin
    assert mb.extrapolate({8: 700, 16: 690}, 32) == pytest.approx(690 * 4)  # no growth measured: the larger, scaled
    assert mb.probe_sizes(128) == [32, 64] and mb.probe_sizes(8) == [8] and mb.probe_sizes(20) == [8]


def test_the_probe_extrapolated_from_small_sizes_is_near_a_direct_measurement(sdxl_pipe):
    unet = copy.deepcopy(sdxl_pipe.unet)
    pipe = sdxl_pipe
    ids = pipe.tokenizer(["a probe"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = torch.cat([pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                            pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]], dim=-1)
        pooled = pipe.text_encoder_2(ids).text_embeds

    def measure(side):
        latents = torch.randn(1, 4, side, side, requires_grad=True)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]])}

        def forward():
            return unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=cond).sample

        return mb.graph_bytes(forward, latents, exclude=list(unet.parameters()))

    direct = measure(32)
    estimate = mb.extrapolate({side: measure(side) for side in mb.probe_sizes(32)}, 32)
    assert abs(estimate - direct) <= 0.15 * direct, (estimate, direct)


def test_images_per_graph():
    assert mb.images_per_graph("inversion_dpo_x0", 2, 1, 8, 2.0) == 8  # 2B x K x 2 (guidance)
    assert mb.images_per_graph("inversion_dpo_x0", 2, 20, 8, 1.0) == 32  # the chunk holds every evaluated step
    assert mb.images_per_graph("diffusion_dpo", 2, 1, 8, 2.0) == 4
    assert mb.images_per_graph("sft", 2, 1, 8, 2.0) == 2


@pytest.mark.parametrize("lora", [False, True])
def test_the_plan_counts_the_bytes_a_tiny_run_holds(sdxl_pipe, lora):
    from peft import LoraConfig

    unet = copy.deepcopy(sdxl_pipe.unet)
    if lora:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    shape = mb.RunShape(loss_type="inversion_dpo_x0", batch_size=1, chunk=1, evaluated=4, guidance=1.0,
                        optimizer="adamw", lora=lora, reference_loaded=not lora)
    sizes = mb.Sizes(policy_bytes=mb.module_bytes(unet), trainable_shapes=[tuple(p.shape) for p in trainable],
                     reference_bytes=2 * sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n),
                     frozen_bytes=0, activation_per_image=0)
    parts = mb.plan(shape, sizes).parts
    optimizer = stepped(trainable, torch.optim.AdamW(trainable, lr=1e-3))
    # counted independently: every tensor the module holds, every gradient, every optimiser state tensor
    held = sum(t.numel() * t.element_size() for t in unet.state_dict(keep_vars=True).values())
    assert parts["policy weights"] == held
    assert parts["gradients (float32)"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert parts["optimiser state (adamw)"] == state_bytes(optimizer)
    reference = copy.deepcopy(sdxl_pipe.unet).to(torch.bfloat16)
    assert parts["reference copy"] == (0 if lora else sum(p.numel() * 2 for p in reference.parameters()))
    assert parts["DDP gradient buckets"] == 0


def test_largest_chunk_is_the_largest_that_fits():
    shape = mb.RunShape(loss_type="inversion_dpo_x0", batch_size=1, chunk=1, evaluated=10, guidance=1.0,
                        optimizer="adafactor", lora=False, reference_loaded=True)
    sizes = mb.Sizes(policy_bytes=1000, trainable_shapes=[(10, 10)], reference_bytes=500, frozen_bytes=0,
                     activation_per_image=100)
    fixed = sum(mb.plan(shape, sizes).parts.values()) - 2 * 100  # everything but the activations (2 images, K = 1)
    limit = int((fixed + 2 * 100 * 4) * (1 + mb.MARGIN)) + 1  # room for K = 4 exactly
    assert mb.largest_chunk(shape, sizes, limit) == 4
    assert mb.largest_chunk(shape, sizes, 10) == 1  # nothing fits: the least memory there is
    assert mb.largest_chunk(shape, sizes, None) == 10  # no limit known: every evaluated step
