"""Model-level tools: streaming fit, anomaly maps, thresholds, model files, export."""
