"""Sharing a model: the saved model folder (config, weights, card, pinned encoders), `save_pretrained`,
`from_pretrained`, `push_to_hub` and `export`."""
