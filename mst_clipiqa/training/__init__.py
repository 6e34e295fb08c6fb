"""Training: the LightningModule around the network, checkpoints and the run's folder, callbacks, launchers, and
several splits trained in one loop."""
