"""Write a small torchvision ResNet-18 state dict (10 classes, random weights) for trying ftwt out.

    python benchmarks/example_checkpoint.py example-resnet18.pth && ftwt attach example-resnet18.pth
"""
import sys

import torch
import torchvision

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "example-resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), out)
    print(f"wrote {out}")
