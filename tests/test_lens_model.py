"""The CPU fixes in the model and the loss: per-layer text normalisation, timestep sampling,
the `cpu` preset, and that runs written before them still load."""

from __future__ import annotations

import pytest
import torch

from recaption.config import ConfigError
from recaption.lens.config import load_lens_config
from recaption.lens.flow import TIMESTEPS, flow_loss, shift_timesteps
from recaption.lens.model import MMDiT, TextNorm

SMALL = ["model.width=32", "model.depth=1", "model.heads=2"]


def test_each_text_layer_arrives_at_unit_scale():
    torch.manual_seed(0)
    # three "layers" of 8 features at very different scales, as MiniLM's hidden states are
    text = torch.cat([torch.randn(2, 5, 8) * s + m for s, m in ((0.2, 1), (1, 0), (6, -3))], -1)
    out = TextNorm(24, 3)(text).unflatten(-1, (3, 8))
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5, 3), atol=1e-5)
    assert torch.allclose(out.std(-1, unbiased=False), torch.ones(2, 5, 3), atol=1e-3)
    # one LayerNorm over the concatenation leaves the small layer small
    joint = torch.nn.LayerNorm(24)(text).unflatten(-1, (3, 8))
    assert joint[..., 0, :].std() < 0.2


def test_a_run_from_before_the_fixes_still_loads():
    """`text_norm: joint` is the original model: same parameter names and shapes, and a
    saved config without the new keys reads as it did."""
    old = load_lens_config("tiny", SMALL)
    assert old.model.text_norm == "joint" and old.timesteps == "logit_normal"
    assert old.timestep_shift == 1.0
    model = MMDiT(old.model, text_dim=12, text_layers=3)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["text_in.0.weight"] == (12,) and shapes["text_in.1.weight"] == (32, 12)
    new = MMDiT(load_lens_config("cpu", SMALL).model, text_dim=12, text_layers=3)
    assert {k for k in new.state_dict() if k.startswith("text_in")} == {
        "text_in.0.norm.weight",
        "text_in.0.norm.bias",
        "text_in.1.weight",
        "text_in.1.bias",
    }


def test_timestep_samplers_and_the_shift():
    g = torch.Generator().manual_seed(0)
    for name, sample in TIMESTEPS.items():
        t = sample(20_000, g, torch.device("cpu"))
        assert t.min() >= 0 and t.max() <= 1, name
    uniform = TIMESTEPS["uniform"](20_000, g, torch.device("cpu"))
    logit = TIMESTEPS["logit_normal"](20_000, g, torch.device("cpu"))
    # logit-normal rarely trains the noisy end, where a 32x32 scene's layout is decided
    assert (logit > 0.9).float().mean() < 0.03 < 0.08 < (uniform > 0.9).float().mean()
    shifted = shift_timesteps(logit, 3.0)
    assert shifted.mean() > logit.mean() + 0.15
    assert torch.equal(shift_timesteps(logit, 1.0), logit)


def test_the_loss_uses_the_configured_timesteps():
    torch.manual_seed(0)
    model = MMDiT(load_lens_config("cpu", SMALL).model, text_dim=12, text_layers=3)
    for p in model.parameters():  # adaLN-Zero predicts 0 whatever t is; wake it up
        torch.nn.init.normal_(p, std=0.05)
    x0, text = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 5, 12)
    mask = torch.ones(4, 5, dtype=torch.bool)
    losses = {
        (name, shift): flow_loss(
            model, x0, text, mask, torch.Generator().manual_seed(1), name, shift
        )
        for name in TIMESTEPS
        for shift in (1.0, 3.0)
    }
    assert all(torch.isfinite(v) for v in losses.values())
    assert len({round(v.item(), 6) for v in losses.values()}) == len(losses)  # other t each


def test_the_x0_weighting_is_the_error_of_the_implied_clean_image():
    """x0 = x_t - t v, so 3 t^2 times the squared velocity error is 3x the x0 error."""
    from recaption.lens.flow import loss_weight

    torch.manual_seed(0)
    t = torch.rand(6)
    x0, noise, v_hat = torch.randn(3, 6, 3, 4, 4).unbind(0)
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * noise
    x0_error = (xt - tb * v_hat - x0).pow(2)
    weighted = loss_weight(t, "x0") * (v_hat - (noise - x0)).pow(2)
    assert torch.allclose(weighted, 3 * x0_error, atol=1e-5)
    assert loss_weight(t, "velocity") == 1.0
    assert load_lens_config("cpu", ["loss_weight=x0"]).loss_weight == "x0"
    assert load_lens_config("tiny").loss_weight == "velocity"


def test_x_prediction_returns_the_velocity_of_the_clean_image_it_draws():
    """`prediction: x0`: the network draws the clean image and forward returns the velocity
    that leads to it, so one Euler step of size t lands on the network's image; a config
    saved before the option (no key) still predicts the velocity."""
    from recaption.lens.model import MIN_T

    torch.manual_seed(0)
    cfg = load_lens_config("cpu", [*SMALL, "model.prediction=x0"]).model
    assert load_lens_config("cpu").model.prediction == "velocity"
    x_pred = MMDiT(cfg, text_dim=12, text_layers=3)
    v_pred = MMDiT(cfg.model_copy(update={"prediction": "velocity"}), text_dim=12, text_layers=3)
    for p in x_pred.parameters():  # adaLN-Zero outputs 0 at init; wake it up
        torch.nn.init.normal_(p, std=0.05)
    v_pred.load_state_dict(x_pred.state_dict())  # the same network, read two ways
    x, text = torch.randn(4, 3, 32, 32), torch.randn(4, 5, 12)
    mask = torch.ones(4, 5, dtype=torch.bool)
    t = torch.tensor([1.0, 0.6, 0.2, 0.01])
    drawn = v_pred(x, t, text, mask)  # the raw network output: x-prediction's clean image
    v = x_pred(x, t, text, mask)
    tb = t.clamp(min=MIN_T).view(-1, 1, 1, 1)
    assert torch.allclose(x - tb * v, drawn, atol=1e-5)
    assert torch.allclose(v[0], x[0] - drawn[0], atol=1e-5)  # at pure noise: v = e - x0


def test_the_last_block_skips_only_text_work_nothing_reads():
    """The last joint block leaves out the text stream's queries, projection and MLP: the
    prediction is exactly the full block's, and those weights get no gradient."""
    from recaption.lens.model import JointBlock

    torch.manual_seed(0)
    cfg = load_lens_config("cpu", [*SMALL, "model.depth=2", "model.text_depth=null"])
    model = MMDiT(cfg.model, 12, text_layers=3)
    for p in model.parameters():  # adaLN-Zero outputs 0 at init; wake it up
        torch.nn.init.normal_(p, std=0.05)
    x, t, text = torch.randn(3, 3, 32, 32), torch.rand(3), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    skipped = model(x, t, text, mask)
    full_forward = JointBlock.forward
    try:  # every block as a middle one
        JointBlock.forward = lambda self, *a: full_forward(self, *a[:4], False, *a[5:])
        full = model(x, t, text, mask)
    finally:
        JointBlock.forward = full_forward
    assert torch.allclose(skipped, full, atol=1e-6)
    model(x, t, text, mask).square().mean().backward()
    last = model.blocks[-1].text
    assert last.mlp[0].weight.grad is None and last.proj.weight.grad is None
    assert model.blocks[0].text.mlp[0].weight.grad.abs().sum() > 0


def test_grid_positions_tell_neighbouring_patches_apart():
    """DiT's frequencies barely turn across an 8x8 grid; `positions: grid` spreads them over
    it: the `cpu` preset's. Old configs (no key) keep DiT's."""
    from recaption.lens.config import ModelConfig
    from recaption.lens.model import position_embedding_2d

    assert load_lens_config("cpu").model.positions == "grid"
    assert load_lens_config("tiny").model.positions == ModelConfig().positions == "dit"

    def varying_share(pos: torch.Tensor) -> float:  # of the embedding's energy
        return float((pos - pos.mean(0)).pow(2).sum() / pos.pow(2).sum())

    def neighbours(pos: torch.Tensor) -> float:  # cosine of two adjacent patches
        unit = torch.nn.functional.normalize(pos, dim=1)
        return float(unit[27] @ unit[28])

    dit, grid = position_embedding_2d(8, 128), position_embedding_2d(8, 128, fit=True)
    assert varying_share(dit) < 0.2 < 0.7 < varying_share(grid)
    assert neighbours(grid) < 0.9 < 0.95 < neighbours(dit)
    model = MMDiT(load_lens_config("cpu", [*SMALL, "model.positions=grid"]).model, 12, 3)
    assert torch.allclose(model.pos[0], position_embedding_2d(8, 32, fit=True))


def test_rotary_positions_make_attention_depend_on_the_offset_between_patches():
    """`positions: rope`: an image query meets an image key by their offset alone (the same
    pair of vectors scores alike one row down), and a text key, never turned, by the query's
    own place."""
    from recaption.lens.model import rotary_2d, rotate

    torch.manual_seed(0)
    angles = rotary_2d(8, 16)
    q, k = torch.randn(16), torch.randn(16)

    def score(at_q: int, at_k: int) -> float:
        return float(
            rotate(q[None], angles[at_q : at_q + 1])[0]
            @ rotate(k[None], angles[at_k : at_k + 1])[0]
        )

    assert abs(score(0 * 8 + 1, 2 * 8 + 3) - score(1 * 8 + 1, 3 * 8 + 3)) < 1e-5  # a row down
    assert abs(score(9, 9) - float(q @ k)) < 1e-5
    assert abs(score(0, 30) - score(0, 29)) > 1e-3  # another offset, another score
    to_text = [float(rotate(q[None], angles[i : i + 1])[0] @ k) for i in (0, 27, 63)]
    assert max(to_text) - min(to_text) > 1e-2
    model = MMDiT(load_lens_config("cpu", [*SMALL, "model.positions=rope"]).model, 12, 3)
    assert (
        model.angles.shape == (64, 8)
        and MMDiT(load_lens_config("cpu", SMALL).model, 12, 3).angles is None
    )


def test_text_mix_carries_neighbouring_words_and_never_the_padding():
    """`model.text_mix: k`: a depthwise convolution over the caption's tokens. It starts as
    the identity (the same prediction as without it), a token then reads words at most k // 2
    away, and padding past the mask changes nothing."""
    torch.manual_seed(0)
    plain = MMDiT(load_lens_config("cpu", [*SMALL, "model.text_mix=0"]).model, 12, 3)
    mixed = MMDiT(load_lens_config("cpu", [*SMALL, "model.text_mix=5"]).model, 12, 3)
    for model in (plain, mixed):
        for name, p in model.named_parameters():
            if "text_mix" not in name:  # wake adaLN-Zero up, the same weights in both
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    x, t, text = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 9, 12)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3], dtype=torch.bool)
    assert torch.allclose(plain(x, t, text, mask), mixed(x, t, text, mask), atol=1e-6)

    torch.nn.init.normal_(mixed.text_mix.weight, std=0.3)  # as if trained
    padded = text.clone()
    padded[1, 6:] = 100.0  # garbage where the mask says no token
    assert torch.allclose(mixed(x, t, text, mask), mixed(x, t, padded, mask), atol=1e-5)

    txt = torch.randn(1, 9, 32)
    moved = txt.clone()
    moved[0, 0] += 1.0  # the first word changes
    out = (mixed.text_mix(moved.transpose(1, 2)) - mixed.text_mix(txt.transpose(1, 2))).abs()
    reach = out.sum(1)[0] > 0
    assert reach[:3].all() and not reach[3:].any()  # tokens 0..2 read it (k // 2 = 2), no further
    assert MMDiT(load_lens_config("tiny", SMALL).model, 12, 3).text_mix is None
    with pytest.raises(ConfigError, match="must be odd"):
        load_lens_config("cpu", ["model.text_mix=4"])


def test_a_caption_that_only_lends_keys_and_values():
    """`model.text_depth: d`: blocks from d on do not update the caption's tokens. Their
    text streams hold only what that takes (keys and values), every weight the model has
    gets a gradient, and such a block computes exactly what the text-skipping last block of
    a model without `text_depth` does with the same weights."""
    torch.manual_seed(0)
    full = MMDiT(
        load_lens_config("cpu", [*SMALL, "model.depth=2", "model.text_depth=null"]).model, 12, 3
    )
    lends = MMDiT(
        load_lens_config("cpu", [*SMALL, "model.depth=2", "model.text_depth=1"]).model, 12, 3
    )
    for p in full.parameters():  # adaLN-Zero outputs 0 at init; wake it up
        torch.nn.init.normal_(p, std=0.05)
    w = full.cfg.width
    weights = full.state_dict()
    # the lending stream's keys and values, and its norm's shift and scale, are the first
    # rows after the queries, and the first two of the six modulations
    weights["blocks.1.text.qkv.weight"] = weights["blocks.1.text.qkv.weight"][w:]
    weights["blocks.1.text.qkv.bias"] = weights["blocks.1.text.qkv.bias"][w:]
    weights["blocks.1.text.adaln.1.weight"] = weights["blocks.1.text.adaln.1.weight"][: 2 * w]
    weights["blocks.1.text.adaln.1.bias"] = weights["blocks.1.text.adaln.1.bias"][: 2 * w]
    unused = {k for k in weights if k.startswith("blocks.1.text.") and k not in lends.state_dict()}
    assert unused == {
        k for k in weights if k.startswith(("blocks.1.text.proj", "blocks.1.text.mlp"))
    } | {"blocks.1.text.q_norm.weight"}
    lends.load_state_dict({k: v for k, v in weights.items() if k not in unused})
    x, t, text = torch.randn(3, 3, 32, 32), torch.rand(3), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    assert torch.allclose(lends(x, t, text, mask), full(x, t, text, mask), atol=1e-6)

    none = MMDiT(
        load_lens_config("cpu", [*SMALL, "model.depth=2", "model.text_depth=0"]).model, 12, 3
    )
    for p in none.parameters():
        torch.nn.init.normal_(p, std=0.05)
    none(x, t, text, mask).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in none.parameters())
    assert sum(p.numel() for p in none.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ConfigError, match="must be below depth"):
        load_lens_config("cpu", ["model.text_depth=4"])
