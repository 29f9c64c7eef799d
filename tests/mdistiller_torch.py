"""mdistiller's CIFAR ResNet written in PyTorch (spec §2.1), for tests that compare this project
with PyTorch: training steps (test_reference_step.py) and exported students (test_train.py)."""

import torch
import torch.nn.functional as F

from sortkd_jax import porting


class TorchBlock(torch.nn.Module):
  """mdistiller resnet.py BasicBlock (spec §2.1): the shortcut is added before the last ReLU."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(cout)
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(cout))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(torch.nn.Module):
  """mdistiller resnet.py's CIFAR ResNet of depth 6n+2, widths 16/16/32/64 (resnet8, resnet14)."""

  def __init__(self, depth, num_classes=100):
    super().__init__()
    n, widths = (depth - 2) // 6, (16, 16, 32, 64)
    self.conv1 = torch.nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for stage, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(TorchBlock(cin, width, stride if i == 0 else 1))
        cin = width
      setattr(self, f"layer{stage}", torch.nn.Sequential(*blocks))
    self.fc = torch.nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(F.avg_pool2d(x, 8).flatten(1))


def torch_model(depth, flax_model):
  """The PyTorch twin of a Flax CIFAR ResNet: every tensor but num_batches_tracked copied."""
  model = TorchCifarResNet(depth, porting.num_classes_of(flax_model))
  weights = porting.export_state_dict(flax_model)
  missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()},
                                              strict=False)
  assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
  return model
