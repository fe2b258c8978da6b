"""Where and how a command runs: the device and autocast precision (``device``), and the torchrun process group
(``dist``). Evaluation, training, loading, the demo and the sweep all need them, so they sit below every other layer
but the settings."""
