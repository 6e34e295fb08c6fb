"""Callbacks: the run's resolved config in its own folder and on W&B (`SaveConfigToWandb`), and per-sample views of
every validation and test on W&B (`WandbEvaluationLogger`): what a metric cannot show.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from PIL import ImageOps
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from mst_clipiqa.data.preprocess import open_image
from mst_clipiqa.errors import BadImageError
from mst_clipiqa.training.checkpoints import new_run_file, run_dir

COLUMNS = ("index", "score", "mos", "coarse_share")
"""Per-sample values collected from each evaluation step, in the column order of the gathered tensor."""


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class SaveConfigToWandb(SaveConfigCallback):
    """Writes config.yaml into the run's own folder (`run_dir`, never over an earlier run's file) rather than
    `Trainer.log_dir`, which every run under a `WandbLogger` shares, and sends the whole resolved config to every W&B
    logger of the run (Lightning logs only the modules' hyperparameters), so runs can be filtered on any option."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer)  # every rank: a broadcast
        if trainer.is_global_zero:
            path = new_run_file(trainer, folder, self.config_filename)
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.log_hyperparams(config)


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's (N_rank, C) tensor in rank order (N_rank may differ); a collective, so every rank
    calls it. Outside DDP the tensor comes back as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    return torch.cat(gather_all_tensors(rows))


class WandbEvaluationLogger(L.Callback):
    """Logs to W&B, at the end of each validation and test, over the whole set gathered from all ranks:

    - ``{stage}/pred_vs_mos``: a scatter plot of every prediction against its MOS;
    - ``{stage}/worst`` and ``{stage}/worst_images``: the worst-predicted images (largest |prediction - MOS|) as a
      table (thumbnail, name, prompt, MOS, prediction) and as images of the run, which an offline run folder keeps
      for `wandb sync` (wandb stages a table's images outside it);
    - ``{stage}/coarse_share`` and ``{stage}/coarse_share_hist``: the mean of `GatedFusion`'s gate, the coarse
      stream's share of each fused feature, over the set and as a histogram.

    It reads the per-sample outputs of `MSTCLIPIQAModule`'s evaluation steps; images, names and prompts come from
    the data module's table by row index, so cached embeddings do as well. Does nothing without a `WandbLogger`.

    Args:
        worst_k: rows in the table of worst-predicted images.
        thumbnail_size: side, in pixels, of the square thumbnails (each image fitted in and padded: W&B shows a list
            of images of one size only).
    """

    def __init__(self, worst_k: int = 16, thumbnail_size: int = 160):
        self.worst_k = worst_k
        self.thumbnail_size = thumbnail_size
        self._rows: list[Tensor] = []

    # ---- collection (every rank) -----------------------------------------------------------------------------

    def _collect(self, trainer: L.Trainer, outputs: Any) -> None:
        if not wandb_loggers(trainer) or trainer.sanity_checking or not isinstance(outputs, dict):
            return
        columns = [torch.as_tensor(outputs[name], device=outputs["score"].device).double() for name in COLUMNS]
        self._rows.append(torch.stack(columns, dim=1))  # (B, 4)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")

    # ---- report (gathered, logged on rank 0) -----------------------------------------------------------------

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or trainer.sanity_checking:
            return
        local = torch.cat(self._rows) if self._rows else torch.empty(0, len(COLUMNS), dtype=torch.float64)
        self._rows = []
        rows = gather_rows(local.to(pl_module.device)).cpu()  # (N, 4), the whole evaluation set
        if not trainer.is_global_zero or len(rows) == 0:
            return
        rows = rows[rows[:, 0].argsort()]  # by row index: the same order whatever the number of ranks
        media = self._media(trainer, stage, rows)
        for logger in loggers:
            logger.experiment.log({**media, "trainer/global_step": trainer.global_step})

    def _media(self, trainer: L.Trainer, stage: str, rows: Tensor) -> dict[str, Any]:
        import wandb

        index = rows[:, 0].long().tolist()
        score, mos, share = rows[:, 1].tolist(), rows[:, 2].tolist(), rows[:, 3].tolist()
        points = wandb.Table(columns=["index", "mos", "prediction"], data=[list(r) for r in zip(index, mos, score)])
        error = (rows[:, 1] - rows[:, 2]).abs()
        worst = error.argsort(descending=True)[: self.worst_k].tolist()
        info = self._row_info(trainer, [index[i] for i in worst])
        table = wandb.Table(columns=["image", "name", "prompt", "mos", "prediction", "abs_error", "index"])
        images = []
        for i, row in zip(worst, info):
            image = row.get("image")
            if image is not None:
                image = wandb.Image(image, caption=f"{row['name']}: MOS {mos[i]:.4g}, predicted {score[i]:.4g}")
                images.append(image)
            table.add_data(image, row.get("name"), row.get("prompt"), mos[i], score[i], error[i].item(), index[i])
        scatter = wandb.plot.scatter(points, "mos", "prediction", title=f"{stage}: prediction vs MOS")
        return {
            f"{stage}/pred_vs_mos": scatter,
            **({f"{stage}/worst_images": images} if images else {}),
            f"{stage}/worst": table,
            f"{stage}/coarse_share": sum(share) / len(share),
            f"{stage}/coarse_share_hist": wandb.Histogram(share),
        }

    def _row_info(self, trainer: L.Trainer, index: list[int]) -> list[dict[str, Any]]:
        """Thumbnail, name and prompt of the given table rows; empty dicts when the data module has no table."""
        load_table = getattr(trainer.datamodule, "load_table", None)
        if load_table is None:
            return [{} for _ in index]
        info = []
        for row in load_table().select(index):
            try:
                image = ImageOps.pad(open_image(row["image"]), (self.thumbnail_size, self.thumbnail_size))
            except BadImageError:
                image = None
            info.append({"image": image, "name": row.get("name"), "prompt": row.get("prompt")})
        return info
