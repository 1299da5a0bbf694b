"""Method names, importable without torch or scikit-learn so the CLI starts fast."""

BASELINES = ("random", "input_l2", "pca_error", "pca_mahalanobis", "knn1", "iforest", "lstm_untrained",
             "product_error_norm", "product_diag_gauss")
METHODS = ("product",) + BASELINES
