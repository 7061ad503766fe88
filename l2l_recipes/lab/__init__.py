"""Measurement tools beside the training code: `speed` (the throughput harness behind
`l2l-recipes speed`). Nothing in training imports them."""
