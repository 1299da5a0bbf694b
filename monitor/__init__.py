"""Deep Anomaly Monitor: anomaly detection for Prometheus metrics with an LSTM autoencoder."""

__version__ = "0.1.0"
