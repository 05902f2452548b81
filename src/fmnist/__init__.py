"""fmnist: CNNs for Fashion-MNIST, from the lab assignment to serving and export."""

__version__ = "0.1.0"
