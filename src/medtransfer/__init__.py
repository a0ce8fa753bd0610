"""medtransfer: ImageNet vs RadImageNet transfer learning for medical imaging, tracked in MLflow and DVC."""

__version__ = "0.1.0"
