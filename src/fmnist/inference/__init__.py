"""Inference on trained checkpoints: the shared forward path, Predictor, ONNX export and runtime.
Nothing here imports training code."""
