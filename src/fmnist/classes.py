"""The one place that knows the dataset's label names and pixel statistics."""

# Index i is label i in the IDX label files (Xiao, Rasul, Vollgraf 2017, table 1).
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

# Mean and std of the 60,000 training images scaled to [0, 1]; models normalise with
# these inside forward() so every caller feeds plain [0, 1] pixels.
MEAN = 0.2860
STD = 0.3530
