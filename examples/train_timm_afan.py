"""A-FAN in a plain training loop: a timm model on an ImageFolder, or on the built-in Shapes
data when no folder is given. Nothing is downloaded (the model starts from random weights).

    python examples/train_timm_afan.py                                  # Shapes, resnet10t
    python examples/train_timm_afan.py --folder path/to/train --model resnet26d --at layer2
"""
import argparse

import timm
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

import afan
from afan_harness.shapes import ShapesDataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--folder", help="an ImageFolder (one sub-folder per class); default: Shapes")
parser.add_argument("--model", default="resnet10t", help="a timm model name")
parser.add_argument("--at", default="layer2", help="the module whose output A-FAN attacks")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--images", type=int, default=1024, help="Shapes images (without --folder)")
args = parser.parse_args()

if args.folder:
    data = datasets.ImageFolder(args.folder, transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64),
                                                                 transforms.ToTensor()]))
    classes = len(data.classes)
else:
    data, classes = ShapesDataset("classification", "train", size=args.images, image_size=32), 6
loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)

model = timm.create_model(args.model, pretrained=False, num_classes=classes)
# Images stay in [0, 1]; the model normalises them itself, so its split points move under "1.".
model = torch.nn.Sequential(afan.Normalize(afan.input_norm.IMAGENET_MEAN, afan.input_norm.IMAGENET_STD), model)
objective = afan.AFAN(model, f"1.{args.at}", steps=5, step_size=0.5 / 255, n=2, mask="01")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

for epoch in range(args.epochs):
    correct = seen = 0
    for x, y in loader:
        step = objective.step(x, y, F.cross_entropy)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        correct += (step.output.argmax(1) == y).sum().item()
        seen += len(y)
    print(f"epoch {epoch + 1}: loss {step.loss.item():.3f}, training accuracy {correct / seen:.3f}", flush=True)
