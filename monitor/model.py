"""The LSTM autoencoder and its training loop (torch, CPU, float32)."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class LSTMAutoencoder(nn.Module):
    """Encode a window into one latent vector, then decode the window back from it.

    Input [batch, time, inputs]; output [batch, time, outputs]. Inputs may carry extra calendar
    features that are not reconstructed, so `outputs <= inputs`.
    """

    def __init__(self, inputs: int, outputs: int, hidden_size: int, latent_size: int, layers: int = 1):
        super().__init__()
        self.encoder = nn.LSTM(inputs, hidden_size, num_layers=layers, batch_first=True)
        self.to_latent = nn.Linear(hidden_size, latent_size)
        self.decoder = nn.LSTM(latent_size, hidden_size, num_layers=layers, batch_first=True)
        self.to_output = nn.Linear(hidden_size, outputs)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.encoder(windows)
        latent = self.to_latent(hidden[-1])
        repeated = latent.unsqueeze(1).expand(-1, windows.shape[1], -1)
        decoded, _ = self.decoder(repeated)
        return self.to_output(decoded)


@dataclass
class FitResult:
    best_validation_loss: float
    epochs: int
    final_training_loss: float


def _masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    squared = (reconstruction - target) ** 2 * mask
    return squared.sum() / mask.sum().clamp(min=1.0)


def _as_tensors(inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Missing target cells (NaN) are excluded from the loss through the mask; the network receives
    # them as 0, the median after scaling.
    mask = ~np.isnan(targets)
    return (
        torch.from_numpy(np.nan_to_num(inputs, nan=0.0).astype(np.float32)),
        torch.from_numpy(np.nan_to_num(targets, nan=0.0).astype(np.float32)),
        torch.from_numpy(mask.astype(np.float32)),
    )


def fit(
    model: LSTMAutoencoder,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    epochs: int,
    patience: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    should_stop=lambda: False,
) -> FitResult:
    """Train with Adam on masked MSE; stop early on the validation loss and keep the best weights.

    `train` and `validation` are (inputs, targets) pairs of arrays [window, time, features].
    """
    x_train, y_train, m_train = _as_tensors(*train)
    x_val, y_val, m_val = _as_tensors(*validation)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)

    best_loss = math.inf
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    epoch = 0
    training_loss = math.nan
    for epoch in range(1, epochs + 1):
        if should_stop():
            break
        training_loss = _train_epoch(model, optimiser, x_train, y_train, m_train, batch_size, generator)
        validation_loss = evaluate_loss(model, x_val, y_val, m_val, batch_size)
        logger.debug("epoch %d: training loss %.5f, validation loss %.5f", epoch, training_loss, validation_loss)
        if validation_loss < best_loss - 1e-7:
            best_loss, stale = validation_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break

    model.load_state_dict(best_state)
    return FitResult(best_loss, epoch, training_loss)


def _train_epoch(model, optimiser, inputs, targets, mask, batch_size, generator) -> float:
    model.train()
    order = torch.randperm(inputs.shape[0], generator=generator)
    total, count = 0.0, 0
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        optimiser.zero_grad()
        loss = _masked_mse(model(inputs[batch]), targets[batch], mask[batch])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
        optimiser.step()
        total += loss.item() * len(batch)
        count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss(model, inputs, targets, mask, batch_size: int) -> float:
    model.eval()
    total, weight = 0.0, 0.0
    for first in range(0, inputs.shape[0], batch_size):
        part = slice(first, first + batch_size)
        squared = (model(inputs[part]) - targets[part]) ** 2 * mask[part]
        total += float(squared.sum())
        weight += float(mask[part].sum())
    return total / max(weight, 1.0)


@torch.no_grad()
def reconstruct(model: LSTMAutoencoder, inputs: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Return the reconstruction of windows [window, time, inputs] as float64."""
    model.eval()
    tensor = torch.from_numpy(np.nan_to_num(inputs, nan=0.0).astype(np.float32))
    parts = [model(tensor[first:first + batch_size]) for first in range(0, tensor.shape[0], batch_size)]
    if not parts:
        return np.empty((0, inputs.shape[1], model.to_output.out_features))
    return torch.cat(parts).double().numpy()
