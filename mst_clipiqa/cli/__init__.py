"""The `mst-clipiqa` command: the entry point and the commands beyond the Trainer's (`commands`), the Trainer's
commands on LightningCLI (`trainer`), the benchmark runner, and one-line errors for parser mistakes."""
