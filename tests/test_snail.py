"""SNAIL: the blocks against a direct computation, the causal structure (no position sees a later
one, no query sees another), batched queries equal the paper's one sequence per query, the
Predictor's contract, and a short real run on Omniglot that learns."""
import dataclasses

import pytest
import torch

from l2l_recipes import harness, registry
from l2l_recipes.errors import UserError
from l2l_recipes.recipes import snail

FEATURES = 64  # conv4's feature size on Omniglot


def tiny(ways=5, shots=2):
    """A SNAIL model for `ways`-way `shots`-shot Omniglot in float64, eval mode."""
    torch.manual_seed(0)
    cfg = snail.Config(ways=ways, shots=shots, device="cpu")
    return cfg, snail.build_model(cfg).double().eval()


def episode_features(cfg, queries=4, batch=2, seed=1):
    """Random support features with labels (every class `shots` times, shuffled) and query features."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.ways * cfg.shots
    support = torch.randn(batch, n, FEATURES, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.randperm(n, generator=g) % cfg.ways for _ in range(batch)])
    query = torch.randn(batch, queries, FEATURES, generator=g, dtype=torch.float64)
    return support, labels, query


def max_change(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
def test_causal_convolution_matches_its_definition(dilation):
    torch.manual_seed(0)
    conv = snail.CausalConv(3, 4, dilation).double()
    support, query = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    out = conv(torch.cat([support, query], 1), 6)
    w0, w1, b = conv.linear.weight[:, :3], conv.linear.weight[:, 3:], conv.linear.bias

    def direct(sequence, t):  # out[t] = W0 x[t - d] + W1 x[t], x before the start = 0
        before = sequence[:, t - dilation] @ w0.T if t >= dilation else 0
        return before + sequence[:, t] @ w1.T + b
    for t in range(6):
        assert torch.allclose(out[:, t], direct(support, t))
    for j in range(5):  # each query ends its own sequence: the support, then that query
        assert torch.allclose(out[:, 6 + j], direct(torch.cat([support, query[:, j:j + 1]], 1), 6))


def test_attention_matches_a_direct_computation():
    torch.manual_seed(0)
    block = snail.AttentionBlock(3, 4, 2).double()
    support, query = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    out = block(torch.cat([support, query], 1), 5)
    w_query, w_key, w_value = block.qkv.weight.split([4, 4, 2])
    b_query, b_key, b_value = block.qkv.bias.split([4, 4, 2])

    def read(sequence, t):  # position t attends to positions 0..t, logits scaled by 1/sqrt(key size)
        keys = sequence[:, : t + 1] @ w_key.T + b_key
        values = sequence[:, : t + 1] @ w_value.T + b_value
        logits = (keys @ (sequence[:, t] @ w_query.T + b_query).unsqueeze(-1)).squeeze(-1) / 2
        return (logits.softmax(-1).unsqueeze(-1) * values).sum(1)
    for t in range(5):
        assert torch.allclose(out[:, t], torch.cat([support[:, t], read(support, t)], -1))
    for j in range(3):
        sequence = torch.cat([support, query[:, j:j + 1]], 1)
        assert torch.allclose(out[:, 5 + j], torch.cat([query[:, j], read(sequence, 5)], -1))


def test_tc_block_depth_and_dilations_follow_the_paper():
    # T = 5 * 1 + 1 = 6: ceil(log2 6) = 3 dense blocks, dilations 2, 4, 8 (Algorithm 2)
    block = snail.TCBlock(10, 6, 128)
    assert [b.conv.dilation for b in block.blocks] == [2, 4, 8]
    assert block.out_channels == 10 + 3 * 128
    assert len(snail.TCBlock(10, 101, 128).blocks) == 7  # 20-way 5-shot


# ----------------------------------------------------------------------------- causal structure

@pytest.mark.parametrize("position", [0, 4, 9])
def test_support_outputs_never_depend_on_later_positions(position):
    cfg, model = tiny()
    support, labels, query = episode_features(cfg)
    before_support, before_query = model.sequence(support, labels, query)
    # change the example at `position`, its features and its label
    support2, labels2 = support.clone(), labels.clone()
    support2[:, position] += torch.randn_like(support2[:, position])
    labels2[:, position] = (labels2[:, position] + 1) % cfg.ways
    after_support, after_query = model.sequence(support2, labels2, query)
    assert max_change(after_support[:, :position], before_support[:, :position]) < 1e-12
    # and the change does reach that position, every later one and every query
    assert (after_support[:, position:] - before_support[:, position:]).abs().amax(-1).min() > 1e-6
    assert (after_query - before_query).abs().amax(-1).min() > 1e-6


def test_a_query_never_sees_another_query():
    cfg, model = tiny()
    support, labels, query = episode_features(cfg, queries=4)
    _, before = model.sequence(support, labels, query)
    query2 = query.clone()
    query2[:, 2] += torch.randn_like(query2[:, 2])
    _, after = model.sequence(support, labels, query2)
    assert max_change(after[:, [0, 1, 3]], before[:, [0, 1, 3]]) < 1e-12
    assert max_change(after[:, 2], before[:, 2]) > 1e-6


def plain_sequence(model, tokens):
    """Logits at every position of one plain causal sequence of tokens (features + label vector)."""
    for block in model.blocks:
        tokens = block(tokens, tokens.shape[1])  # every position a support position: no query
    return model.head(tokens)


@pytest.mark.parametrize("ways, shots", [(5, 1), (5, 2), (3, 5)])
def test_batched_queries_equal_one_sequence_per_query(ways, shots):
    cfg, model = tiny(ways, shots)
    support, labels, query = episode_features(cfg, queries=3)
    support_logits, query_logits = model.sequence(support, labels, query)
    support_tokens = torch.cat([support, torch.nn.functional.one_hot(labels, ways).double()], -1)
    assert torch.allclose(plain_sequence(model, support_tokens), support_logits, atol=1e-10)
    for j in range(3):
        # the paper's layout: the labelled support set, then this query with a zero label vector
        query_token = torch.cat([query[:, j:j + 1], torch.zeros(2, 1, ways, dtype=torch.float64)], -1)
        logits = plain_sequence(model, torch.cat([support_tokens, query_token], 1))
        assert torch.allclose(logits[:, -1], query_logits[:, j], atol=1e-10)


# ----------------------------------------------------------------------------- Predictor

def omniglot_like_task(ways, shots, queries, seed=2):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(ways * shots, 1, 28, 28, generator=g, dtype=torch.float64)
    qx = torch.rand(ways * queries, 1, 28, 28, generator=g, dtype=torch.float64)
    return sx, torch.arange(ways).repeat_interleave(shots), qx


def test_query_logits_do_not_depend_on_the_other_queries_or_their_order():
    cfg, model = tiny()
    predictor = snail.Predictor(cfg, model, torch.device("cpu"))
    sx, sy, qx = omniglot_like_task(5, 2, 3)
    logits = predictor.predict(sx, sy, qx)
    assert logits.shape == (15, 5)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(predictor.predict(sx, sy, qx[order]), logits[order], atol=1e-10)
    assert torch.allclose(predictor.predict(sx, sy, qx[4:5]), logits[4:5], atol=1e-10)  # alone
    # deterministic: the support set is read in an order fixed by test_seed
    assert torch.equal(predictor.predict(sx, sy, qx), logits)


def test_predictor_refuses_other_ways():
    cfg, model = tiny()
    sx, sy, qx = omniglot_like_task(3, 2, 1)
    with pytest.raises(UserError, match="5-way label vectors; got a 3-way task"):
        snail.Predictor(cfg, model, torch.device("cpu")).predict(sx, sy, qx)


def test_resnet_backbone_and_config_check():
    assert registry.get_recipe("snail-mini-imagenet-5w1s").config().backbone == "resnet"
    torch.manual_seed(0)
    cfg = registry.get_recipe("snail-cifar-fs-5w1s").config()
    model = snail.build_model(cfg).eval()
    assert model.embed(torch.rand(2, 3, 32, 32)).shape == (2, 384)  # the paper's 384 features
    with pytest.raises(UserError, match="backbone='vgg' is out of range"):
        snail.Config(backbone="vgg")


@pytest.mark.parametrize("name,dtype,tolerance", [
    ("snail-omniglot-5w1s", torch.float64, 1e-9),
    ("snail-cifar-fs-5w1s", torch.float32, 0.0),  # the resnet: its modules run as they are, bit for bit
])
def test_fast_engine_gives_the_modules_outputs_and_gradients(name, dtype, tolerance):
    """engine=fast (fast.conv4_embed, channels-last weights for the conv4 backbone) against
    engine=reference (the module's forward), in training mode: the same logits, batch norm
    statistics and gradients (relative to each parameter's largest gradient)."""
    base = registry.get_recipe(name).config()
    models = {}
    for engine in ("reference", "fast"):
        torch.manual_seed(0)
        cfg = dataclasses.replace(base, engine=engine, device="cpu")
        model = snail.build_model(cfg).to(dtype).train()
        if engine == "fast" and cfg.backbone == "conv4":
            model = model.to(memory_format=torch.channels_last)
        models[engine] = model
    g = torch.Generator().manual_seed(4)
    side, channels, n = (28, 1, 3) if base.dataset == "omniglot" else (32, 3, 1)
    sx = torch.rand(n, base.ways * base.shots, channels, side, side, generator=g).to(dtype)
    sy = torch.stack([torch.randperm(base.ways * base.shots, generator=g) % base.ways for _ in range(n)])
    qx = torch.rand(n, base.ways, channels, side, side, generator=g).to(dtype)
    qy = torch.arange(base.ways).repeat(n, 1)
    logits = {}
    for engine, model in models.items():
        torch.manual_seed(5)  # the resnet's dropout
        logits[engine] = model(sx, sy, qx)
        torch.nn.functional.cross_entropy(logits[engine].flatten(0, 1), qy.flatten()).backward()
    assert max_change(logits["fast"], logits["reference"]) <= tolerance * 1e-3
    reference = dict(models["reference"].named_parameters())
    for key, p in models["fast"].named_parameters():
        expected = reference[key].grad
        scale = expected.abs().max().item()
        if key.endswith("conv.bias") and scale < 1e-12:  # exactly 0 before batch norm, rounding noise in both
            continue
        assert max_change(p.grad, expected) <= tolerance * scale, key
    buffers = dict(models["reference"].named_buffers())
    for key, b in models["fast"].named_buffers():
        assert max_change(b.double(), buffers[key].double()) <= tolerance * 1e-3, key

# ----------------------------------------------------------------------------- learning

def test_snail_learns_omniglot_5w1s(tmp_path, data_root):
    recipe = registry.get_recipe("snail-omniglot-5w1s")
    # short: 500 steps of 4 episodes (the recipe: 20,000 of 32), 16 conv4 filters instead of 64,
    # 5 queries per class at test time; about 25 s of one CPU core (1000 steps, which reach 0.63,
    # are in benchmarks/learning_checks.py)
    cfg = dataclasses.replace(recipe.config(), iterations=500, meta_batch_size=4, hidden_size=16,
                              val_interval=500, val_episodes=10, queries=5, test_episodes=100, device="cpu")
    run = harness.Run(tmp_path / "run", recipe.name, cfg, torch.device("cpu"), data_root=data_root,
                      progress=False)
    recipe.load_module().train(cfg, run)
    result = harness.meta_test(run.path, device="cpu", data_root=data_root, progress=False)
    # chance is 20% on 5-way tasks of unseen characters (measured: 0.47 with seed 42)
    assert result["episodes"] == 100 and result["accuracy"] > 0.35, result
