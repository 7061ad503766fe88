"""How far ProtoNet's training gradient in bf16 mixed precision (`--set amp=bf16`) is from the
float64 one, next to float32's, on real Omniglot 60-way 1-shot 5-query episodes: the evidence
docs/speed.md gives for letting a long CPU run train in bf16.

    python benchmarks/amp_gradients.py [--episodes 3] [--weights RUN_DIR/best.pt]

The step is the recipe's: the embedding through `fast.conv4_embed` under autocast, the prototypes,
distances and loss in float32; the network in training mode at its initial weights (seed 1) or
at the weights of a run. One thread.

Measured 2026-12-07 11:55-12:02 (commit 24e68df plus this file, 2-core Zen 4 EPYC beside a
two-thread bench): at the initial weights (3 episodes) bf16 relative error 0.12-0.15, cosine
0.989-0.993, float32 3.5e-4 to 7.4e-4; at the weights of a 300-episode bf16 run (5 episodes over
two calls) bf16 0.08-0.12, cosine 0.993-0.997, float32 2.1e-3 to 7.4e-3; two episodes' exact
gradients 1.34-1.40 apart (relative).
"""
import argparse

import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, registry

protonet = registry.get_recipe("protonet-omniglot-5w1s").load_module()


def gradient(model, x, y, dtype, amp):
    """The flattened gradient and loss of one training step on images x (support first)."""
    model = model.to(dtype)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        embeddings = fast.conv4_embed(model, x.to(dtype))
        ways = int(y.max()) + 1
        logits = protonet.proto_logits(embeddings[:ways].to(dtype), y[:ways], embeddings[ways:].to(dtype), ways)
        loss = F.cross_entropy(logits, y[ways:])
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()]), loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--weights", help="a run's best.pt or ckpt.pt (default: the initial weights)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = protonet.protonet_omniglot_5w1s()
    tasks = data.taskset(data.load_split("omniglot", "train", args.data_root), 60, 1, 5)
    weights = torch.load(args.weights, map_location="cpu", weights_only=False)["model"] if args.weights else None
    previous = None
    for episode in range(args.episodes):
        sx, sy, qx, qy = data.split_support_query(*tasks.sample(), 1)
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        grads = {}
        for name, dtype, amp in [("float64", torch.float64, False), ("float32", torch.float32, False),
                                 ("bf16", torch.float32, True)]:
            torch.manual_seed(1)
            model = protonet.build_model(cfg).train()
            if weights is not None:
                model.load_state_dict(weights)
            grads[name] = gradient(model, x, y, dtype, amp)
        exact = grads["float64"][0]
        line = [f"episode {episode}: loss {grads['float64'][1]:.4f}"]
        if previous is not None:  # for scale: how far apart two episodes' exact gradients are
            line.append(f"previous episode's relative difference {float((previous - exact).norm() / exact.norm()):.2f}")
        previous = exact
        for name in ("float32", "bf16"):
            g = grads[name][0]
            line.append(f"{name} relative error {float((g - exact).norm() / exact.norm()):.2e} "
                        f"cosine {float(F.cosine_similarity(g, exact, 0)):.4f}")
        print(", ".join(line), flush=True)


if __name__ == "__main__":
    main()
