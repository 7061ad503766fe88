"""Matching Networks' attention: softmax over cosines (the paper) or minus squared distances."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from l2l_recipes.errors import UserError
from l2l_recipes.recipes import matchingnet


@pytest.mark.parametrize("distance,scale", [("cosine", 1.0), ("cosine", 100.0), ("l2", 1.0)])
def test_attention_sums_the_support_weights_per_class(distance, scale):
    cfg = dataclasses.replace(matchingnet.matchingnet_omniglot_5w1s(), shots=2, distance=distance, cosine_scale=scale)
    torch.manual_seed(0)
    model = matchingnet.build_model(cfg).double().eval()
    sx, qx = torch.rand(10, 1, 28, 28, dtype=torch.float64), torch.rand(7, 1, 28, 28, dtype=torch.float64)
    sy = torch.tensor([3, 0, 1, 4, 2, 2, 0, 4, 1, 3])
    with torch.no_grad():
        got = model(sx, sy, qx, 5).exp()
        s, q = model.embed(sx), model.embed(qx)
    for i in range(7):
        if distance == "cosine":
            scores = torch.tensor([scale * F.cosine_similarity(q[i], s[j], dim=0) for j in range(10)])
        else:
            scores = torch.tensor([-torch.dist(q[i], s[j]) ** 2 for j in range(10)])
        weights = scores.double().softmax(0)
        expected = torch.stack([weights[sy == c].sum() for c in range(5)])
        assert torch.allclose(got[i], expected, rtol=1e-9, atol=1e-12)


def test_unknown_distance_is_refused():
    with pytest.raises(UserError, match="distance='dot' is out of range: use cosine or l2"):
        dataclasses.replace(matchingnet.matchingnet_omniglot_5w1s(), distance="dot")
