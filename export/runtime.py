"""Load any exported variant by name and score padded lists: the one module serve/ imports.

Why a module of its own: serving, the accuracy gate and the model-level benchmark must run the
variants the same way (same thread settings, same execution providers, same session options), or
the benchmark measures something that is never served. Every ONNX Runtime session here uses
`intra_op_num_threads=threads`, `inter_op_num_threads=1` and sequential execution (our graphs are a
chain: parallel execution only adds scheduling), and by default no spinning of idle intra-op
threads: spinning buys a few microseconds per call when the cores are free, but on a shared serving
host every replica's spinning threads burn the cores the other replicas need (set
`allow_spinning=True` for a dedicated core set).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Manifest, VariantEntry, sha256_of
from models.paths import default_model_name, variants_dir

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


# The model the lab serves: the MLP trained with its default loss.
DEFAULT_MODEL = default_model_name("mlp")


class InvalidVariantError(ValueError):
    """The variant failed the accuracy gate (retention < 99%): never served by default."""


class Scorer(ABC):
    """One loaded variant. `score_lists` works for every ranker, `score_documents` for pointwise ones.

    Scores are float32; padding positions of `score_lists` get -inf so that a sort puts them last.
    """

    variant: str = ""
    model: str = ""
    version: str = ""
    n_features: int
    pointwise: bool
    threads: int
    device: str

    def score_lists(self, features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """features float32[B, L, F], mask bool[B, L] (True = real document) -> float32[B, L]."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 3 or features.shape[2] != self.n_features:
            raise ValueError(f"features: must have shape [lists, docs, {self.n_features}], got {features.shape}")
        mask = np.ones(features.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != features.shape[:2]:
            raise ValueError(f"mask: must have shape {features.shape[:2]}, got {mask.shape}")
        scores = np.full(mask.shape, -np.inf, dtype=np.float32)
        if features.shape[0] == 0 or features.shape[1] == 0:
            return scores
        if self.pointwise:  # only real documents are scored: padding costs nothing
            scores[mask] = self._score_rows(np.ascontiguousarray(features[mask]))
        else:
            raw = self._score_padded(np.ascontiguousarray(features), np.ascontiguousarray(mask))
            scores[mask] = raw[mask]
        return scores

    def score_documents(self, X: np.ndarray) -> np.ndarray:
        """X float32[N, F] -> float32[N]; pointwise models only (a listwise score needs its list)."""
        if not self.pointwise:
            raise TypeError(f"score_documents: {self.model} is listwise; use score_lists(features, mask)")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"features: must have shape [docs, {self.n_features}], got {X.shape}")
        if X.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        return self._score_rows(np.ascontiguousarray(X))

    @abstractmethod
    def _score_rows(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _score_padded(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model}/{self.variant}, threads={self.threads}, device={self.device})"


def session_options(threads: int = 1, allow_spinning: bool = False) -> Any:
    """The ONNX Runtime session options every variant runs with (the module docstring says why)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3
    return options


class OrtScorer(Scorer):
    """An ONNX Runtime session over one variant file."""

    def __init__(self, path: Path, *, pointwise: bool, n_features: int, threads: int = 1,
                 providers: list[str] | None = None, allow_spinning: bool = False) -> None:
        import onnxruntime as ort

        self.providers = resolve_providers(providers)
        self.session = ort.InferenceSession(str(path), session_options(threads, allow_spinning),
                                            providers=self.providers)
        self.pointwise, self.n_features, self.threads = pointwise, n_features, threads
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"

    def _score_rows(self, X: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"features": X})[0].reshape(-1)

    def _score_padded(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"features": features, "mask": mask})[0]


class TorchScorer(Scorer):
    """The trained PyTorch model itself (torch-eager), the reference and the naive baseline.

    `torch.set_num_threads` is process-wide: the last loaded torch scorer sets it for all of them.
    """

    def __init__(self, model: Any, *, pointwise: bool, n_features: int, threads: int = 1,
                 device: str = "cpu", bf16: bool = False) -> None:
        import torch

        torch.set_num_threads(threads)
        self.module = model.eval().to(device)
        self.pointwise, self.n_features, self.threads, self.device = pointwise, n_features, threads, device
        self.bf16 = bf16  # torch-bf16: matmuls under torch.autocast(bfloat16)

    def _run(self, *arrays: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            tensors = [torch.from_numpy(a).to(self.device) for a in arrays]
            return self.module(*tensors).float().cpu().numpy()

    def _score_rows(self, X: np.ndarray) -> np.ndarray:
        return self._run(X).reshape(-1)

    def _score_padded(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._run(features, mask)


def resolve_providers(providers: list[str] | str | None) -> list[str]:
    """None -> CPU; "auto" -> CUDA first when ONNX Runtime has it; a list is kept in order, minus the
    providers this onnxruntime build lacks (a warning names them), CPU always last as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return [CPU]
    if providers == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(providers, str):
        providers = [providers]
    missing = [p for p in providers if p not in available]
    if missing:
        warnings.warn(f"providers: {missing} not available in this onnxruntime ({available}); skipped",
                      stacklevel=3)
    chosen = [p for p in providers if p in available]
    return chosen + ([CPU] if CPU not in chosen else [])


def torch_device(providers: list[str] | str | None) -> str:
    """The torch device matching an ONNX Runtime provider list (CUDA only when torch sees a GPU)."""
    import torch

    wants_cuda = providers == "auto" or (isinstance(providers, list | tuple) and CUDA in providers) \
        or providers == CUDA
    return "cuda" if wants_cuda and torch.cuda.is_available() else "cpu"


def open_variant(path: Path, fmt: str, *, pointwise: bool, n_features: int, threads: int = 1,
                 providers: list[str] | str | None = None, allow_spinning: bool = False,
                 precision: str = "fp32") -> Scorer:
    """A scorer over a variant file without a manifest (used while building and gating variants)."""
    if fmt == "torch":
        from models.train import load_checkpoint

        model, _card = load_checkpoint(Path(path))
        return TorchScorer(model, pointwise=pointwise, n_features=n_features, threads=threads,
                           device=torch_device(providers), bf16=precision == "bf16")
    return OrtScorer(Path(path), pointwise=pointwise, n_features=n_features, threads=threads,
                     providers=providers, allow_spinning=allow_spinning)


def manifest_file(model: str | None = None, manifest_path: Path | str | None = None) -> Path:
    return Path(manifest_path) if manifest_path else variants_dir(model or DEFAULT_MODEL) / "manifest.json"


def load_manifest(model: str | None = None, manifest_path: Path | str | None = None) -> dict:
    """The validated manifest of a model's variants as a dict (schema: export/manifest.py)."""
    path = manifest_file(model, manifest_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; run `python export/quantize.py` first")
    return Manifest.load(path).model_dump()


def load_scorer(variant: str, model: str | None = None, *, threads: int = 1,
                providers: list[str] | str | None = None, manifest_path: Path | str | None = None,
                allow_invalid: bool = False, allow_spinning: bool = False) -> Scorer:
    """Load one variant of a model by name from its manifest.

    Refuses a variant that failed the accuracy gate unless `allow_invalid=True`, and a file whose
    sha256 differs from the manifest's (it was rebuilt or damaged after the gate ran).
    """
    if threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    path = manifest_file(model, manifest_path)
    manifest = Manifest.load(path) if path.exists() else None
    if manifest is None:
        raise FileNotFoundError(f"{path}: no manifest; run `python export/quantize.py` first")
    entry: VariantEntry | None = manifest.variants.get(variant)
    if entry is None and variant in manifest.skipped:
        raise KeyError(f"variant: {variant!r} was skipped on the CPU that built {path}: {manifest.skipped[variant]}")
    if entry is None:
        raise KeyError(f"variant: {variant!r} is not in {path} (has: {sorted(manifest.variants)})")
    if not entry.valid and not allow_invalid:
        raise InvalidVariantError(
            f"variant: {variant!r} failed the accuracy gate (NDCG@10 retention {entry.accuracy.retention:.4f} "
            f"< 0.99); pass allow_invalid=True to load it anyway")
    file = path.parent / entry.file
    if sha256_of(file) != entry.sha256:
        raise ValueError(f"variant: {file} does not match the sha256 in {path}; rebuild with export/quantize.py")
    scorer = open_variant(file, entry.format, pointwise=manifest.model.pointwise,
                          n_features=manifest.model.n_features, threads=threads, providers=providers,
                          allow_spinning=allow_spinning, precision=entry.precision)
    scorer.variant, scorer.model = variant, manifest.model.name
    scorer.version = f"{manifest.model.version}-{entry.sha256[:12]}"
    return scorer
