"""l2l-recipes: reproducible meta-learning recipes on top of learn2learn.

    import l2l_recipes
    predictor = l2l_recipes.load("runs/protonet-omniglot-5w1s/<time>-s42")
    logits = predictor.predict(support_x, support_y, query_x)
"""
__version__ = "0.1.0"


def load(run_dir, device="auto", data_root=None):
    """The trained predictor of a run directory (see l2l_recipes.harness.load)."""
    from l2l_recipes.harness import load as _load
    return _load(run_dir, device, data_root)
