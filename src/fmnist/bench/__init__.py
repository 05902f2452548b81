"""`fmnist bench`: throughput, time-to-accuracy, photos, ONNX and HTTP load measurements, written to JSON."""
