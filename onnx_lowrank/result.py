"""What ``compress`` returns: the compressed model with its report (``CompressionResult``),
and where the model of a lazily loaded input lives until it is saved (``spill``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .errors import ValidationFailedError
from .load import LoadedModel, model_file_size, model_to_graph, open_model
from .save import remove_stale_temporaries, save_model, temporary_prefix
from .types import FOLDED_KEY, Analysis

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from .records import CompressionReport

__all__ = ["SPILLED", "CompressionResult", "record_folded", "spill"]


@dataclass
class CompressionResult:
    """The compressed model and the report of how it was made.

    Attributes:
        model: the compressed model.
        report: what was done and measured.
        data_dir: folder of the input model when ``model`` still reads weights from the input's
            external data files (models loaded lazily, see ``load.open_model``).
        source_data_files: the input's external data files; ``save`` never writes to them.
    """

    model: onnx.ModelProto
    report: CompressionReport
    data_dir: Path | None = None
    source_data_files: tuple[Path, ...] = ()
    _spill: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    def save(
        self, path: str | os.PathLike, *, external_data: bool | None = None, force: bool = False
    ) -> Path:
        """Write the model atomically.

        Args:
            path: the target ``.onnx`` file.
            external_data: store the weights in ``<path>.data``; None (default) does so when the
                input model had external data or the output exceeds 2 GiB.
            force: write even when validation failed.

        Raises:
            ValidationFailedError: the model failed validation and ``force`` is False.
            OutputPathError: the path cannot be written.
        """
        validation = self.report.validation
        if validation is not None and not validation.passed and not force:
            raise ValidationFailedError(
                "refusing to save a model that failed validation: "
                + "; ".join(validation.failures),
                validation,
            )
        started = time.perf_counter()
        if external_data is None:
            external_data = bool(self.source_data_files)
        written = save_model(
            self.model,
            path,
            external_data=external_data,
            data_dir=self.data_dir,
            protect=self.source_data_files,
            force=bool(self.report.config.get("force")),  # the input failed the checker too
        )
        self.report.timings["save"] = time.perf_counter() - started
        self.report.size_bytes_after = model_file_size(written)
        return written

    def graph(self) -> gs.Graph:
        """The compressed model as a new ``onnx_graphsurgeon.Graph``, for pipelines that go on
        with their own graphsurgeon passes without writing a file. Weights that a lazily loaded
        model still reads from the input's external data files are read into the graph.

        Validation is not re-checked here: look at ``report.validation`` (``save`` refuses a
        model that failed it; a graph is handed out either way).
        """
        return model_to_graph(self.model, self.data_dir)


def record_folded(compressed: onnx.ModelProto, analysis: Analysis) -> None:
    """Record under ``FOLDED_KEY`` how many parameters folding removed, this run and earlier
    ones, so a later run budgets against the original model (the folded constants are gone
    from the model and from every factorized layer's record)."""
    removed = analysis.params_total - (analysis.params_model or analysis.params_total)
    total = analysis.discovery.folded_params + removed
    entry = next((p for p in compressed.metadata_props if p.key == FOLDED_KEY), None)
    if entry is None:
        entry = compressed.metadata_props.add()
        entry.key = FOLDED_KEY
    entry.value = str(total)


#: File name of the compressed model in the spill folder of a lazily loaded model.
SPILLED = "compressed.onnx"
#: Spill folders are ``<temp>/onnx-lowrank-spill.<host>-<pid>.<random>``.
_SPILL_STEM = "onnx-lowrank-spill"


def spill(
    compressed: onnx.ModelProto, loaded: LoadedModel, force: bool
) -> tuple[tempfile.TemporaryDirectory, onnx.ModelProto]:
    """Write the compressed model of a lazily loaded input to a temporary folder (external
    data) and load it back lazily, so its weights leave memory too. The folder lives as long
    as the ``CompressionResult`` that holds it; its name carries this process's id, so the next
    run removes it if this one is killed before it can."""
    temp = Path(tempfile.gettempdir())
    remove_stale_temporaries(temp, _SPILL_STEM)
    folder = tempfile.TemporaryDirectory(prefix=temporary_prefix(_SPILL_STEM), dir=temp)
    path = save_model(
        compressed,
        Path(folder.name) / SPILLED,
        external_data=True,
        data_dir=loaded.data_dir,
        force=force,
    )
    return folder, open_model(path, check=False, lazy=True).model
