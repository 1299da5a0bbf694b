"""Save and load model bundles atomically; set aside corrupt or mismatched ones.

Layout under `storage.path`:
    <detector>/models/<version>/{weights.pt, arrays.npz, metadata.json}
    <detector>/CURRENT          the version that serves, replaced atomically
    <detector>/rejected/        versions that failed to load, kept for inspection
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from monitor.bundle import ModelBundle
from monitor.model import LSTMAutoencoder
from monitor.scaling import Scaler
from monitor.scoring import ErrorStatistics, Threshold

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEEP_VERSIONS = 3


class ModelFileError(Exception):
    """A saved model that cannot be used; the message names the file and the problem."""


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _arrays(bundle: ModelBundle) -> dict[str, np.ndarray]:
    entities = list(bundle.scalers)
    signals = len(bundle.signals)
    return {
        "scaler_entities": np.array([json.dumps(list(key)) for key in entities], dtype=str),
        "scaler_center": np.array([bundle.scalers[k].center for k in entities]).reshape(-1, signals),
        "scaler_scale": np.array([bundle.scalers[k].scale for k in entities]).reshape(-1, signals),
        "pooled_center": bundle.pooled_scaler.center,
        "pooled_scale": bundle.pooled_scaler.scale,
        "error_mean": bundle.statistics.mean,
        "error_covariance": bundle.statistics.covariance,
        "error_precision": bundle.statistics.precision,
        "threshold_reference": bundle.threshold.reference,
    }


def _metadata(bundle: ModelBundle) -> dict:
    network = bundle.network
    threshold = bundle.threshold
    return {
        **bundle.metadata,
        "format_version": FORMAT_VERSION,
        "fingerprint": bundle.fingerprint,
        "signals": bundle.signals,
        "calendar": bundle.calendar,
        "network": {
            "inputs": network.encoder.input_size,
            "outputs": network.to_output.out_features,
            "hidden_size": network.encoder.hidden_size,
            "latent_size": network.to_latent.out_features,
            "layers": network.encoder.num_layers,
        },
        "statistics": {"condition_number": bundle.statistics.condition_number,
                       "shrinkage": bundle.statistics.shrinkage},
        "threshold": {
            "method": threshold.method, "false_alarm_rate": threshold.false_alarm_rate,
            "value": threshold.value, "signals": threshold.signals,
            "aggregate_steps": threshold.aggregate_steps, "tail_start": threshold.tail_start,
            "tail_share": threshold.tail_share, "gpd_shape": threshold.gpd_shape,
            "gpd_scale": threshold.gpd_scale,
        },
    }


def save_bundle(folder: Path, bundle: ModelBundle) -> Path:
    """Write a bundle as a new version and make it CURRENT; return the version's folder."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    # Names sort by save time, to the microsecond: pruning and the fallback in load_latest keep the
    # newest versions by name, and with whole seconds two saves in one second sorted at random.
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    version = f"{stamp}.{int(now % 1 * 1e6):06d}Z-{uuid.uuid4().hex[:8]}"
    staging = models / f".{version}.tmp"
    staging.mkdir()

    torch.save(bundle.network.state_dict(), staging / "weights.pt")
    np.savez(staging / "arrays.npz", **_arrays(bundle))
    (staging / "metadata.json").write_text(json.dumps(_metadata(bundle), indent=2, default=float))
    for child in staging.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())

    target = models / version
    os.rename(staging, target)
    _fsync_dir(models)
    _write_text_atomically(folder / "CURRENT", version + "\n")
    _prune(models, keep=version)
    return target


def _prune(models: Path, keep: str) -> None:
    versions = sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in versions[:-KEEP_VERSIONS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in models.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _read_metadata(version: Path) -> dict:
    path = version / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path}: cannot read model metadata: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported format_version {metadata.get('format_version') if isinstance(metadata, dict) else None!r}, expected {FORMAT_VERSION}")
    return metadata


def load_version(version: Path, fingerprint: str) -> ModelBundle:
    """Load one saved version; raise ModelFileError if it is corrupt or was trained for other settings."""
    metadata = _read_metadata(version)
    if metadata.get("fingerprint") != fingerprint:
        raise ModelFileError(
            f"{version}: trained for other detector settings (fingerprint {metadata.get('fingerprint')!r}, "
            f"config has {fingerprint!r}); it will be retrained")
    try:
        return _build_bundle(version, metadata)
    except ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to decode means the files are unusable
        raise ModelFileError(f"{version}: corrupt model files: {type(error).__name__}: {error}") from None


def _build_bundle(version: Path, metadata: dict) -> ModelBundle:
    shape = metadata["network"]
    network = LSTMAutoencoder(shape["inputs"], shape["outputs"], shape["hidden_size"], shape["latent_size"], shape["layers"])
    state = torch.load(version / "weights.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    network.eval()

    with np.load(version / "arrays.npz", allow_pickle=False) as arrays:
        data = {name: arrays[name] for name in arrays.files}
    entities = [tuple(json.loads(text)) for text in data["scaler_entities"]]
    scalers = {key: Scaler(data["scaler_center"][i], data["scaler_scale"][i]) for i, key in enumerate(entities)}
    statistics = ErrorStatistics(data["error_mean"], data["error_covariance"], data["error_precision"],
                                 metadata["statistics"]["condition_number"], metadata["statistics"]["shrinkage"])
    threshold_fields = metadata["threshold"]
    threshold = Threshold(reference=data["threshold_reference"], **threshold_fields)
    _check_shapes(version, metadata, statistics, scalers)

    known = {"format_version", "fingerprint", "signals", "calendar", "network", "statistics", "threshold"}
    return ModelBundle(
        signals=list(metadata["signals"]),
        fingerprint=metadata["fingerprint"],
        network=network,
        scalers=scalers,
        pooled_scaler=Scaler(data["pooled_center"], data["pooled_scale"]),
        statistics=statistics,
        threshold=threshold,
        calendar=bool(metadata["calendar"]),
        metadata={k: v for k, v in metadata.items() if k not in known},
    )


def _check_shapes(version: Path, metadata: dict, statistics: ErrorStatistics, scalers: dict) -> None:
    signals = len(metadata["signals"])
    if statistics.precision.shape != (signals, signals) or statistics.mean.shape != (signals,):
        raise ModelFileError(f"{version}: error statistics do not match the {signals} signals")
    if not (np.all(np.isfinite(statistics.precision)) and np.all(np.isfinite(statistics.mean))):
        raise ModelFileError(f"{version}: error statistics contain NaN or Inf")
    for scaler in scalers.values():
        if scaler.scale.shape != (signals,) or np.any(~(scaler.scale > 0)):
            raise ModelFileError(f"{version}: a scaler has the wrong shape or a non-positive scale")


def set_aside(folder: Path, version: Path, reason: str) -> None:
    rejected = folder / "rejected"
    rejected.mkdir(parents=True, exist_ok=True)
    target = rejected / f"{version.name}-{int(time.time())}"
    try:
        os.rename(version, target)
        (target / "REJECTED").write_text(reason + "\n", encoding="utf-8")
        logger.error("model %s set aside in %s: %s", version.name, target, reason)
    except OSError as error:
        logger.error("model %s is unusable (%s) and could not be moved aside: %s", version, reason, error)


def load_latest(folder: Path, fingerprint: str) -> ModelBundle | None:
    """Load the CURRENT version, else the newest version that loads; set aside each that fails."""
    models = folder / "models"
    if not models.is_dir():
        return None
    candidates = sorted((p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
    current = _current_name(folder)
    if current:
        candidates.sort(key=lambda p: p.name != current)

    for version in candidates:
        try:
            bundle = load_version(version, fingerprint)
        except ModelFileError as error:
            set_aside(folder, version, str(error))
            continue
        logger.info("loaded model %s for %s", version.name, folder.name)
        return bundle
    return None


def _current_name(folder: Path) -> str | None:
    try:
        return (folder / "CURRENT").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def reset(folder: Path) -> None:
    """Remove every saved model and the history of a detector, for a start from scratch."""
    for name in ("models", "history", "CURRENT"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
